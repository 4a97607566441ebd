//! `exec` runs as the container's process does, never with more: user, groups,
//! rlimits, capabilities, no_new_privs and the seccomp filter come from the
//! container's config.json unless a flag or the `--process` file names them.
//! Each case runs through stasis and runc on the same bundle (runc is the
//! reference), and what a process is allowed is read from inside it.

use std::fs;
use std::path::Path;

use serde_json::json;

use crate::common::{edit_config, unique_id, Container, Env, Out};

/// One bundle running in stasis and in runc.
struct Both {
    // Dropped first (fields drop in order): the containers must be deleted while
    // their --root still exists, or `delete --force` finds nothing and their
    // cgroups stay behind.
    _guards: (Container, Container),
    stasis: Env,
    runc: Env,
    sid: String,
    rid: String,
}

impl Both {
    /// Runs `sleep 1000` from a busybox bundle edited by `edit`, in both.
    fn start(tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Self {
        let stasis = Env::new();
        let runc = Env::runc();
        let b = stasis.bundle("b", &["sleep", "1000"]);
        edit_config(&b, edit);
        let (sid, rid) = (
            unique_id(&format!("{tag}-s")),
            unique_id(&format!("{tag}-r")),
        );
        let gs = stasis.run_detached(&b, &sid);
        let gr = runc.run_detached(&b, &rid);
        Self {
            stasis,
            runc,
            sid,
            rid,
            _guards: (gs, gr),
        }
    }

    /// `exec FLAGS... ID CMD...` in both (runc wants its flags before the id).
    fn exec(&self, flags: &[&str], cmd: &[&str]) -> (Out, Out) {
        let args = |id: &str| -> Vec<String> {
            let mut a = vec!["exec".to_string()];
            a.extend(flags.iter().map(|s| s.to_string()));
            a.push(id.to_string());
            a.extend(cmd.iter().map(|s| s.to_string()));
            a
        };
        let s = args(&self.sid);
        let r = args(&self.rid);
        let s: Vec<&str> = s.iter().map(String::as_str).collect();
        let r: Vec<&str> = r.iter().map(String::as_str).collect();
        (self.stasis.run(&s), self.runc.run(&r))
    }

    /// Both succeed; returns their stdouts.
    #[track_caller]
    fn exec_ok(&self, flags: &[&str], cmd: &[&str]) -> (String, String) {
        let (s, r) = self.exec(flags, cmd);
        (s.expect_ok().stdout, r.expect_ok().stdout)
    }
}

/// The fields of /proc/self/status that say what a process may do.
fn privileges(status: &str) -> Vec<String> {
    let wanted = [
        "Uid:",
        "Gid:",
        "Groups:",
        "CapInh:",
        "CapPrm:",
        "CapEff:",
        "CapBnd:",
        "CapAmb:",
        "NoNewPrivs:",
        "Seccomp:",
    ];
    let lines: Vec<String> = status
        .lines()
        .filter(|l| wanted.iter().any(|w| l.starts_with(w)))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(lines.len(), wanted.len(), "fields missing in {status:?}");
    lines
}

fn field<'a>(lines: &'a [String], name: &str) -> &'a str {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in {lines:?}"))
        .trim()
}

/// (soft, hard) of "Max open files" in a /proc/PID/limits.
fn nofile(limits: &str) -> (String, String) {
    let l = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no open files limit in {limits:?}"));
    let v: Vec<&str> = l.split_whitespace().collect();
    (v[3].to_string(), v[4].to_string())
}

fn unprivileged_user(c: &mut serde_json::Value) {
    c["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [2000]});
    c["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 256, "hard": 512}]);
}

#[test]
fn exec_runs_as_the_containers_user_with_its_limits_like_runc() {
    requires!(root, busybox, runc);
    let b = Both::start("xuser", unprivileged_user);

    let (s, r) = b.exec_ok(&[], &["id"]);
    assert_eq!(r.trim(), "uid=1000 gid=1000 groups=2000");
    assert_eq!(s, r, "id: stasis vs runc");

    let status = ["cat", "/proc/self/status"];
    let (s, r) = b.exec_ok(&[], &status);
    assert_eq!(privileges(&s), privileges(&r), "stasis vs runc");
    let s = privileges(&s);
    assert_eq!(field(&s, "CapEff:"), "0000000000000000");
    assert_eq!(field(&s, "NoNewPrivs:"), "1");

    // The soft limit is the container's; runc 1.1.5's own is racy (Go raises the
    // soft NOFILE limit of `runc init`, opencontainers/runc#4195), so compare the
    // soft limit with the container's init and the hard one with runc too.
    let limits = ["cat", "/proc/self/limits"];
    let (s, r) = b.exec_ok(&[], &limits);
    let init = b
        .stasis
        .ok(&["exec", &b.sid, "cat", "/proc/1/limits"])
        .stdout;
    assert_eq!(nofile(&init), ("256".into(), "512".into()));
    assert_eq!(nofile(&s), nofile(&init), "exec vs the container's init");
    assert_eq!(nofile(&s).1, nofile(&r).1, "hard limit: stasis vs runc");

    // Flags override only what they name: -u keeps the container's gid and
    // groups, --cap adds to bounding/effective/permitted, -e adds to the env.
    let flags = ["-u", "0", "--cap", "CAP_SYS_ADMIN", "-e", "X=1"];
    let (s, r) = b.exec_ok(&flags, &["id"]);
    assert_eq!(s, r, "id with -u 0: stasis vs runc");
    let (s, r) = b.exec_ok(&flags, &status);
    assert_eq!(privileges(&s), privileges(&r), "-u 0 --cap: stasis vs runc");
    let (s, r) = b.exec_ok(&flags, &["sh", "-c", "echo $X $PATH"]);
    assert_eq!(s, r, "env: stasis vs runc");
    let (s, r) = b.exec_ok(&flags, &limits);
    assert_eq!(
        nofile(&s),
        nofile(&init),
        "-u 0 keeps the container's limits"
    );
    assert_eq!(nofile(&s).1, nofile(&r).1);
}

#[test]
fn exec_with_a_process_file_takes_the_rest_from_the_container_like_runc() {
    requires!(root, busybox, runc);
    let b = Both::start("xproc", unprivileged_user);
    let file = b.stasis.path("process.json");
    fs::write(
        &file,
        json!({
            "user": {"uid": 1000, "gid": 1000},
            "args": ["cat", "/proc/self/status", "/proc/self/limits"],
            "env": ["PATH=/bin"],
            "cwd": "/"
        })
        .to_string(),
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let (s, r) = b.exec_ok(&["--process", f], &[]);
    let (ps, pr) = (privileges(&s), privileges(&r));
    // Where the file says nothing, runc 1.1.5 reads noNewPrivileges as false and
    // leaves the rlimits runc itself had (here a hard NOFILE of 20000, not the
    // container's 512); stasis keeps the container's: never more than the
    // container's process. Capabilities: both take the container's.
    for name in ["Uid:", "Gid:", "Groups:", "CapPrm:", "CapEff:", "CapBnd:"] {
        assert_eq!(field(&ps, name), field(&pr, name), "{name} stasis vs runc");
    }
    assert_eq!(field(&ps, "NoNewPrivs:"), "1");
    assert_eq!(
        field(&ps, "Groups:"),
        "",
        "the file's (no) additional groups"
    );
    assert_eq!(nofile(&s), ("256".into(), "512".into()));
}

fn deny_mkdir(c: &mut serde_json::Value) {
    // No noNewPrivileges: the container runs as root without CAP_SYS_ADMIN and
    // without no_new_privs, as Docker and Podman containers do by default.
    c["process"]
        .as_object_mut()
        .unwrap()
        .remove("noNewPrivileges");
    c["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
}

#[test]
fn exec_runs_under_the_containers_seccomp_filter_like_runc() {
    requires!(root, busybox, runc);
    let b = Both::start("xsecc", deny_mkdir);
    let status = ["cat", "/proc/self/status"];
    for flags in [
        &[][..],
        &["-u", "1000"],
        &["--no-new-privs"],
        &["-u", "1000", "--no-new-privs"],
    ] {
        let (s, r) = b.exec(flags, &["mkdir", "/tmp/d"]);
        for (who, out) in [("stasis", &s), ("runc", &r)] {
            assert_eq!(out.code, Some(1), "{who} exec {flags:?} mkdir: {out:?}");
            assert!(
                out.stderr.contains("Operation not permitted"),
                "{who} exec {flags:?} mkdir: {}",
                out.stderr
            );
        }
        let (s, r) = b.exec_ok(flags, &status);
        let (ps, pr) = (privileges(&s), privileges(&r));
        assert_eq!(field(&ps, "Seccomp:"), "2", "exec {flags:?}");
        // Loading the filter without no_new_privs needs CAP_SYS_ADMIN: none of
        // it may be left in the process.
        assert_eq!(ps, pr, "exec {flags:?}: stasis vs runc");
    }
    assert!(!Path::new(&format!("/proc/{}/root/tmp/d", b.stasis.pid(&b.sid))).exists());
}

#[test]
fn exec_in_a_restored_copy_runs_as_the_containers_process() {
    // A copy restored from the store gets exec'd processes with the same limits,
    // capabilities and seccomp filter as the container it was checkpointed from.
    // (The container's user stays root: this host has no CAP_SYS_RESOURCE, and
    // CRIU cannot read the rlimits of another user's process without it.)
    let Some(sx) = crate::store_flows::Sx::setup(crate::test_name!()) else {
        return;
    };
    let b = sx.bundle("b", &["sleep", "1000"]);
    edit_config(&b, |c| {
        deny_mkdir(c);
        c["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 256, "hard": 512}]);
    });
    let id = unique_id("xcopy");
    let _g = sx.run_d(&b, &id);
    let show = |id: &str| {
        let status = sx.ok(&["exec", id, "cat", "/proc/self/status"]).stdout;
        let limits = sx.ok(&["exec", id, "cat", "/proc/self/limits"]).stdout;
        (privileges(&status), nofile(&limits))
    };
    let before = show(&id);
    assert_eq!(field(&before.0, "Seccomp:"), "2");
    assert_eq!(before.1, ("256".into(), "512".into()));

    sx.ok(&["checkpoint", "--tag", "xcopy", &id]);
    let id2 = unique_id("xcopy2");
    let _g2 = sx.restore_from("xcopy", &id2, &[]);
    assert_eq!(
        show(&id2),
        before,
        "exec in the restored copy vs the original"
    );
    let out = sx.run(&["exec", &id2, "mkdir", "/tmp/d"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("Operation not permitted"), "{out:?}");
}
