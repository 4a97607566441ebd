//! Why a container's process could not start, when the cause is known: the
//! command does not exist, cannot be executed, or the pids limit leaves no room.
//! libcontainer reports these only as text; this module turns its phrases into
//! causes with plain messages and the exit codes podman and Docker use.

/// Why the container's process (of `create`/`run`, or of `exec`) could not start.
/// The phrases "executable file not found in $PATH", "no such file or directory"
/// and "permission denied" are runc's: Docker and podman read them in a runtime's
/// error to pick their exit codes 127 and 126.
#[derive(Debug, thiserror::Error)]
pub enum LaunchFailure {
    #[error("exec: {command:?}: executable file not found in $PATH: check the command's name, or the PATH the process gets (config.json's process.env, or `exec -e PATH=...`)")]
    NotInPath { command: String },
    #[error("exec: {command:?}: no such file or directory in the container's root filesystem")]
    NoSuchFile { command: String },
    #[error("exec: {command:?}: permission denied: it is not an executable file (a directory, or no execute permission for the process's user)")]
    NotExecutable { command: String },
    #[error("no room for the process under the container's pids limit of {limit} (starting one needs room for 2 more for a moment: libcontainer's intermediate process and the process itself): raise it with `stasis update --pids-limit N` or end processes in the container")]
    PidsLimit { limit: u64 },
}

impl LaunchFailure {
    /// 127 when the command does not exist, 126 when it cannot be executed (as
    /// podman, Docker and shells exit), else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            LaunchFailure::NotInPath { .. } | LaunchFailure::NoSuchFile { .. } => 127,
            LaunchFailure::NotExecutable { .. } => 126,
            LaunchFailure::PidsLimit { .. } => 1,
        }
    }
}

/// libcontainer 0.7.0 reports why the process could not start only as text (its
/// init process sends it over a channel; `workload/default.rs` writes "executable
/// 'X' not found in $PATH" and "executable 'X' at path '...' does not have correct
/// permissions"): the known phrases become causes.
pub fn launch_failure(detail: &str) -> Option<LaunchFailure> {
    const EXE: &str = "executable '";
    let start = detail.find(EXE)? + EXE.len();
    let rest = &detail[start..];
    let (command, after) = rest.split_at(rest.find('\'')?);
    let command = command.to_string();
    if after.starts_with("' not found in $PATH") {
        // libcontainer searches $PATH for a path with a slash too; runc (Go's
        // exec.LookPath) says the file does not exist.
        return Some(if command.contains('/') {
            LaunchFailure::NoSuchFile { command }
        } else {
            LaunchFailure::NotInPath { command }
        });
    }
    if after.contains("does not have correct permissions") {
        return Some(LaunchFailure::NotExecutable { command });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The texts libcontainer 0.7.0 produces (`stasis exec` printed them raw).
    #[test]
    fn libcontainer_phrases_become_causes() {
        let pre = "failed to create container: exec process failed with error error in executing process : ";
        let cases = [
            ("executable 'nosuchcmd' not found in $PATH", 127, "executable file not found in $PATH"),
            ("executable '/nonexist/x' not found in $PATH", 127, "no such file or directory"),
            (
                "executable '/etc/passwd' at path '\"/etc/passwd\"' does not have correct permissions",
                126,
                "permission denied",
            ),
        ];
        for (text, code, phrase) in cases {
            let cause = launch_failure(&format!("{pre}{text}")).unwrap();
            assert_eq!(cause.exit_code(), code, "{text}");
            let msg = cause.to_string();
            assert!(msg.contains(phrase), "{msg}");
            assert!(!msg.contains("failed to create container"), "{msg}");
        }
        for other in [
            "failed to create container: intermediate process error failed to launch init process",
            "failed to check permissions for executable 'x' at path '\"x\"' : EIO",
        ] {
            assert!(launch_failure(other).is_none(), "{other}");
        }
    }
}
