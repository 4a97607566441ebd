//! What to do about CRIU failures whose log lines alone do not say it: a table
//! from a known CRIU error line to the remedy, appended to quoted errors.

/// (what the CRIU error line contains, all of them; the hint).
const HINTS: &[(&[&str], &str)] = &[(
    &["Can't get rlimit", "Operation not permitted"],
    "hint: CRIU could not read the rlimits of a process running as a non-root user: \
     root here lacks CAP_SYS_RESOURCE. Give the container a user namespace \
     (linux.uidMappings/gidMappings mapping 0 -> 0, size 65536, as the bundles of \
     images/ do), or checkpoint where root has CAP_SYS_RESOURCE",
)];

/// The hints for CRIU's error `lines`, each on its own line (`\n  hint: ...`),
/// or empty.
pub(crate) fn for_lines(lines: &[&str]) -> String {
    let mut s = String::new();
    for (needles, hint) in HINTS {
        if lines.iter().any(|l| needles.iter().all(|n| l.contains(n))) {
            s.push_str("\n  ");
            s.push_str(hint);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rlimit_error_gets_the_user_namespace_hint() {
        let line =
            "(00.004) Error (criu/cr-dump.c:470): Can't get rlimit 0: Operation not permitted";
        let h = for_lines(&[line]);
        assert!(
            h.contains("user namespace") && h.contains("CAP_SYS_RESOURCE"),
            "{h}"
        );
        assert_eq!(for_lines(&["Error: something else"]), "");
    }
}
