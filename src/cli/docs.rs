//! Documentation generated from the clap definition: shell completions
//! (`stasis completion SHELL`) and man pages (`stasis man DIR`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, CommandFactory};

use super::Cli;

#[derive(Args, Debug)]
pub struct CompletionArgs {
    /// Shell to write the completion script for (bash, zsh, fish, elvish, powershell)
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Directory to write stasis.1 and one page per command (stasis-run.1, ...) into
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

/// Writes the completion script for `shell` to `out`.
pub fn completion(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    clap_complete::generate(shell, &mut Cli::command(), "stasis", out);
}

/// Writes stasis.1 and a page per command and subcommand into `dir` (created).
pub fn man(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("create man page directory {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("write man pages into {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap_complete::Shell;

    #[test]
    fn completions_generate_for_every_shell() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            completion(shell, &mut out);
            let text = String::from_utf8(out).expect("completion script is UTF-8");
            for word in ["checkpoint", "restore", "snapshot", "leave-running"] {
                assert!(text.contains(word), "{shell}: no {word} in the script");
            }
        }
    }

    /// bash itself parses the bash script (`bash -n`: syntax only).
    #[test]
    fn bash_completion_is_valid_bash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stasis.bash");
        let mut out = Vec::new();
        completion(Shell::Bash, &mut out);
        std::fs::write(&path, out).expect("write script");
        let st = std::process::Command::new("bash")
            .arg("-n")
            .arg(&path)
            .status()
            .expect("run bash");
        assert!(st.success());
    }

    #[test]
    fn man_pages_generate_per_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("man1");
        man(&out).expect("generate man pages");
        for page in [
            "stasis.1",
            "stasis-run.1",
            "stasis-checkpoint.1",
            "stasis-snapshot.1",
            "stasis-snapshot-export.1",
        ] {
            let p = out.join(page);
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{page}: {e}"));
            assert!(
                text.starts_with(".ie") || text.contains(".TH"),
                "{page}: {text}"
            );
        }
        let top = std::fs::read_to_string(out.join("stasis.1")).expect("stasis.1");
        assert!(top.contains("warm starts"), "{top}");
    }
}
