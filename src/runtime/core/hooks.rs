//! Hooks that stasis runs itself rather than through libcontainer (part of the
//! libcontainer boundary, `core`): poststart and poststop hooks, whose failures
//! the runtime spec makes warnings, and the hooks of a restored container, which
//! libcontainer never created.

use std::fs;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

use super::{chain_dyn, SigpipeToEpipe};
use crate::runtime::{Result, RuntimeError};

/// The two hook kinds whose failures are warnings, which stasis runs itself.
#[derive(Clone, Copy)]
pub(super) enum HookKind {
    Poststart,
    Poststop,
}

impl HookKind {
    fn name(self) -> &'static str {
        match self {
            HookKind::Poststart => "poststart",
            HookKind::Poststop => "poststop",
        }
    }
}

/// Hooks of one kind taken out of libcontainer's record of a container
/// (`youki_config.json`: the hooks and the cgroup path), so that libcontainer does
/// not run them; `restore` puts the record back as it was.
pub(super) struct TakenHooks {
    path: PathBuf,
    original: Vec<u8>,
    pub(super) hooks: Vec<oci_spec::runtime::Hook>,
}

impl TakenHooks {
    pub(super) fn restore(&self) -> Result<()> {
        crate::runtime::state::write_atomic(&self.path, &self.original)
    }
}

/// libcontainer 0.7's name for its record in the container directory.
const YOUKI_CONFIG: &str = "youki_config.json";

/// Takes the `kind` hooks out of the container's libcontainer record. None when
/// there are none (or no record: nothing was created, so nothing runs them).
pub(super) fn take_hooks(dir: &Path, id: &str, kind: HookKind) -> Result<Option<TakenHooks>> {
    use libcontainer::config::YoukiConfig;
    let path = dir.join(YOUKI_CONFIG);
    let Ok(original) = fs::read(&path) else {
        return Ok(None);
    };
    let Ok(mut cfg) = serde_json::from_slice::<YoukiConfig>(&original) else {
        return Ok(None);
    };
    let Some(h) = cfg.hooks.as_mut() else {
        return Ok(None);
    };
    let hooks = match kind {
        HookKind::Poststart => h.poststart_mut().take(),
        HookKind::Poststop => h.poststop_mut().take(),
    };
    let Some(hooks) = hooks.filter(|l| !l.is_empty()) else {
        return Ok(None);
    };
    let stripped = serde_json::to_vec(&cfg).map_err(|e| RuntimeError::Core {
        op: "record hooks of",
        id: id.to_string(),
        detail: format!("{}: {e}", path.display()),
    })?;
    crate::runtime::state::write_atomic(&path, &stripped)?;
    Ok(Some(TakenHooks {
        path,
        original,
        hooks,
    }))
}

/// Runs `hooks` one after the other with `state` on their stdin, each one even
/// when an earlier one failed; returns one message per failure.
pub(super) fn run_each(
    kind: HookKind,
    hooks: &[oci_spec::runtime::Hook],
    state: &libcontainer::container::State,
    cwd: Option<&Path>,
) -> Vec<String> {
    let _pipe = SigpipeToEpipe::install();
    hooks
        .iter()
        .filter_map(|h| {
            let one = vec![h.clone()];
            libcontainer::hooks::run_hooks(Some(&one), Some(state), cwd, None, None)
                .err()
                .map(|e| {
                    format!(
                        "{} hook {} failed (ignored, as the runtime spec says): {}",
                        kind.name(),
                        h.path().display(),
                        chain_dyn(&e)
                    )
                })
        })
        .collect()
}

/// A warning about container `id` on stderr, where runc's go too.
pub(super) fn warn(id: &str, msg: &str) {
    eprintln!("stasis: warning: container {id:?}: {msg}");
}

/// Runs the spec's hooks of one kind (`prestart`, `createRuntime`, `poststart`,
/// `poststop`) with the OCI state of container `id` (init `pid`). The first
/// failing `prestart`/`createRuntime` hook stops the rest; `poststart` and
/// `poststop` hooks all run and the error lists every failure (a warning).
pub fn run_hooks(kind: &str, spec: &Spec, id: &str, bundle: &Path, pid: i32) -> Result<()> {
    use libcontainer::container::{ContainerStatus, State};
    let _pipe = SigpipeToEpipe::install();
    let Some(h) = spec.hooks().as_ref() else {
        return Ok(());
    };
    let list = match kind {
        "prestart" => h.prestart(),
        "createRuntime" => h.create_runtime(),
        "poststart" => h.poststart(),
        "poststop" => h.poststop(),
        _ => &None,
    };
    if list.as_ref().is_none_or(|l| l.is_empty()) {
        return Ok(());
    }
    let status = if kind == "poststop" {
        ContainerStatus::Stopped
    } else {
        ContainerStatus::Created
    };
    let st = State::new(id, status, Some(pid), bundle.to_path_buf());
    let warn_only = match kind {
        "poststart" => Some(HookKind::Poststart),
        "poststop" => Some(HookKind::Poststop),
        _ => None,
    };
    if let (Some(k), Some(l)) = (warn_only, list.as_ref()) {
        // Every hook runs; the error lists each failure, for a warning.
        let failed = run_each(k, l, &st, None);
        if failed.is_empty() {
            return Ok(());
        }
        return Err(RuntimeError::Core {
            op: "run hooks of",
            id: id.to_string(),
            detail: failed.join("; "),
        });
    }
    libcontainer::hooks::run_hooks(list.as_ref(), Some(&st), None, None, None).map_err(|e| {
        RuntimeError::Core {
            op: "run hooks of",
            id: id.to_string(),
            detail: format!("{kind}: {}", chain_dyn(&e)),
        }
    })
}
