//! Docker (docker.io 20.10 from Debian 12) driving stasis as a runtime:
//! each test starts its own `dockerd` with a private `--data-root`,
//! `--exec-root`, `-H unix://` socket, pidfile, `--cgroup-parent`, vfs storage,
//! `--iptables=false --bridge=none` and `--experimental` (for `docker
//! checkpoint`), with stasis registered by `--add-runtime stasis=BIN`. The image
//! is the busybox rootfs `docker import`ed. `Drop` removes every container,
//! stops that dockerd (and so its containerd), unmounts what is left under the
//! temp dir and removes the cgroups (and an empty /run/docker, which dockerd
//! makes whatever --exec-root says), also when the test panicked. Without
//! dockerd/docker the test prints why it skips (`STASIS_REQUIRE_ALL=1`: fails).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{build_script, runtime_bin, unique_id, wait_until};

const DOCKERD: &str = "/usr/sbin/dockerd";
const DOCKER: &str = "/usr/bin/docker";
const IMAGE: &str = "stasis-busybox:test";
/// How long one docker command may take (`timeout` kills it after that).
const CMD_SECS: &str = "90";

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    #[track_caller]
    fn ok(self, what: &str) -> Out {
        assert_eq!(
            self.code,
            Some(0),
            "{what} failed\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        self
    }
}

struct Docker {
    dir: tempfile::TempDir,
    sock: PathBuf,
    daemon: Child,
    cgroup_parent: String,
    /// Whether a `docker` cgroup existed before this dockerd (it makes one in
    /// every hierarchy, whatever --cgroup-parent says; ours is removed after).
    docker_cgroup_existed: bool,
}

/// Skips (or with STASIS_REQUIRE_ALL=1 fails) without docker.io installed.
fn docker_or_skip(test: &str) -> bool {
    if Path::new(DOCKERD).exists() && Path::new(DOCKER).exists() {
        return true;
    }
    let reason = format!(
        "needs {DOCKERD} and {DOCKER} (apt-get install -y docker.io; scripts/setup installs it)"
    );
    if std::env::var("STASIS_REQUIRE_ALL").as_deref() == Ok("1") {
        panic!("{test}: {reason}");
    }
    eprintln!("SKIP {test}: {reason}");
    false
}

impl Docker {
    fn start() -> Docker {
        let dir = tempfile::Builder::new()
            .prefix("stasis-docker-")
            .tempdir()
            .expect("temp dir");
        let p = |n: &str| dir.path().join(n);
        let sock = p("docker.sock");
        let cgroup_parent = format!("/{}", unique_id("stasis-docker"));
        let docker_cgroup_existed = Path::new("/sys/fs/cgroup/memory/docker").exists();
        let log = fs::File::create(p("dockerd.log")).expect("dockerd log");
        // dockerd's checkpoints leave an image copy (ctrd-checkpoint*) in the temp
        // directory: the test's own, so it goes with the test.
        let tmp = p("tmp");
        fs::create_dir_all(&tmp).expect("temp dir for dockerd");
        let daemon = Command::new(DOCKERD)
            .env("TMPDIR", &tmp)
            .arg("--experimental")
            .arg("--data-root")
            .arg(p("data"))
            .arg("--exec-root")
            .arg(p("exec"))
            .arg("-H")
            .arg(format!("unix://{}", sock.display()))
            .arg("--pidfile")
            .arg(p("dockerd.pid"))
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none"])
            .args(["--storage-driver", "vfs"])
            .arg("--cgroup-parent")
            .arg(&cgroup_parent)
            .arg("--add-runtime")
            .arg(format!("stasis={}", runtime_bin().display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        let d = Docker {
            dir,
            sock,
            daemon,
            cgroup_parent,
            docker_cgroup_existed,
        };
        wait_until("dockerd to answer", Duration::from_secs(60), || {
            d.run(&["info"]).code == Some(0)
        });
        // The image: the busybox rootfs, imported.
        let bundle = d.dir.path().join("bb");
        let st = Command::new(build_script())
            .arg(&bundle)
            .args(["sleep", "1"])
            .output()
            .expect("images/busybox/build");
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        let tar = d.dir.path().join("bb.tar");
        let st = Command::new("tar")
            .arg("-C")
            .arg(bundle.join("rootfs"))
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .expect("tar");
        assert!(st.success());
        d.run(&["import", tar.to_str().unwrap(), IMAGE])
            .ok("docker import");
        d
    }

    fn run(&self, args: &[&str]) -> Out {
        let o = Command::new("timeout")
            .arg(CMD_SECS)
            .arg(DOCKER)
            .arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run docker");
        Out {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> Out {
        self.run(args).ok(&format!("docker {}", args.join(" ")))
    }

    #[track_caller]
    fn status(&self, name: &str) -> String {
        self.ok(&["inspect", "-f", "{{.State.Status}}", name])
            .stdout
            .trim()
            .to_string()
    }

    /// `name`'s counter; None while the shell is rewriting /tmp/count (`echo >`
    /// truncates first, so a read can see it empty).
    fn count(&self, name: &str) -> Option<u64> {
        let out = self.run(&["exec", name, "cat", "/tmp/count"]);
        assert_eq!(out.code, Some(0), "exec cat in {name}: {}", out.stderr);
        out.stdout.trim().parse().ok()
    }

    /// Waits until `name`'s counter exceeds `than`; returns it.
    #[track_caller]
    fn count_above(&self, name: &str, than: u64) -> u64 {
        let mut last = 0;
        wait_until(
            &format!("{name}'s counter to pass {than}"),
            Duration::from_secs(30),
            || {
                last = self.count(name).unwrap_or(0);
                last > than
            },
        );
        last
    }

    /// `docker start --checkpoint CP NAME`. dockerd uploads the checkpoint's files
    /// to its containerd in parallel and, when two have the same content, now and
    /// then fails with "failed to upload checkpoint to containerd: commit failed:
    /// content sha256:...: already exists" (moby/moby#42900, Docker's race, also
    /// with runc); the content is then in place and the next start works, so that
    /// one error is retried (at most 3 times).
    #[track_caller]
    fn start_from_checkpoint(&self, cp: &str, name: &str) {
        for _ in 0..3 {
            let out = self.run(&["start", "--checkpoint", cp, name]);
            if out.code == Some(0) {
                return;
            }
            assert!(
                out.stderr.contains("failed to upload checkpoint")
                    && out.stderr.contains("already exists"),
                "docker start --checkpoint {cp} {name}: {}",
                out.stderr
            );
            eprintln!("docker start --checkpoint hit moby/moby#42900; retrying");
        }
        panic!("docker start --checkpoint {cp} {name} failed 3 times (moby/moby#42900)");
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        let ids = self.run(&["ps", "-aq"]).stdout;
        for id in ids.split_whitespace() {
            let _ = self.run(&["rm", "-f", id]);
        }
        // SAFETY: kill(2) on the pid of our own child process (still unreaped).
        unsafe {
            libc::kill(self.daemon.id() as i32, libc::SIGTERM);
        }
        let t0 = std::time::Instant::now();
        while matches!(self.daemon.try_wait(), Ok(None)) {
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = self.daemon.kill();
                let _ = self.daemon.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Anything dockerd left mounted under the temp dir (netns files, shm).
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(self.dir.path().to_str().unwrap_or("/nonexistent")))
            .collect();
        for m in under.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        // dockerd makes /run/docker/plugins whatever --exec-root says: remove it
        // when empty (remove_dir leaves a directory in use by anything else).
        let _ = fs::remove_dir("/run/docker/plugins");
        let _ = fs::remove_dir("/run/docker");
        // The cgroups of the containers, deepest first.
        if let Ok(rd) = fs::read_dir("/sys/fs/cgroup") {
            for h in rd.flatten() {
                let top = h.path().join(self.cgroup_parent.trim_start_matches('/'));
                if let Ok(sub) = fs::read_dir(&top) {
                    for s in sub.flatten().filter(|s| s.path().is_dir()) {
                        let _ = fs::remove_dir(s.path());
                    }
                }
                let _ = fs::remove_dir(&top);
                if !self.docker_cgroup_existed {
                    // Empty unless another dockerd started meanwhile (then it stays).
                    let _ = fs::remove_dir(h.path().join("docker"));
                }
            }
        }
    }
}

const COUNTER: &str = "trap 'exit 0' TERM; i=0; while true; do i=$((i+1)); \
                       echo $i > /tmp/count; sleep 0.1; done";

/// `docker run --runtime stasis` in the foreground and with -d, exec (output,
/// exit code), stop (SIGTERM, exit 0), rm; then `docker checkpoint create` and
/// `docker start --checkpoint`: the counter carries on from where it was.
#[test]
fn docker_run_exec_stop_rm_checkpoint_start() {
    requires!(root, busybox);
    if !docker_or_skip(crate::test_name!()) {
        return;
    }
    let d = Docker::start();
    let base = ["--runtime", "stasis", "--network", "none"];
    let mut args = vec!["run", "--rm"];
    args.extend(base);
    args.extend([IMAGE, "sh", "-c", "echo hello-from-stasis; exit 0"]);
    let out = d.ok(&args);
    assert_eq!(out.stdout.trim(), "hello-from-stasis", "{}", out.stderr);
    let mut args = vec!["run", "--rm"];
    args.extend(base);
    args.extend([IMAGE, "sh", "-c", "exit 7"]);
    assert_eq!(d.run(&args).code, Some(7));

    let mut args = vec!["run", "-d", "--name", "c1"];
    args.extend(base);
    args.extend([IMAGE, "sh", "-c", COUNTER]);
    d.ok(&args);
    assert_eq!(d.status("c1"), "running");
    let first = d.count_above("c1", 0);
    assert_eq!(d.ok(&["exec", "c1", "echo", "hi"]).stdout.trim(), "hi");
    assert_eq!(d.run(&["exec", "c1", "sh", "-c", "exit 3"]).code, Some(3));
    d.count_above("c1", first);

    // checkpoint (stops the container) and start from it: no restart from 1.
    let before = d.count_above("c1", 20);
    d.ok(&["checkpoint", "create", "c1", "cp1"]);
    assert_eq!(d.status("c1"), "exited");
    d.start_from_checkpoint("cp1", "c1");
    assert_eq!(d.status("c1"), "running");
    // The first value read after the restore: restarted, it would be below.
    let after = d.count_above("c1", 0);
    assert!(
        after >= before,
        "restarted from scratch: {after} < {before}"
    );
    d.count_above("c1", after);

    d.ok(&["stop", "-t", "20", "c1"]);
    assert_eq!(d.status("c1"), "exited");
    let code = d.ok(&["inspect", "-f", "{{.State.ExitCode}}", "c1"]);
    assert_eq!(code.stdout.trim(), "0", "SIGTERM should end it cleanly");
    d.ok(&["rm", "c1"]);
    assert_eq!(d.ok(&["ps", "-aq"]).stdout.trim(), "");
}
