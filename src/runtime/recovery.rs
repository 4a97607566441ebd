//! Recovery from a stasis command that died while working on a container: what
//! a killed checkpoint left frozen is thawed by the next command that loads the
//! container (`Runtime::load`, `Runtime::load_locked`). The records it relies on
//! (`ContainerState::checkpointer`) are written by `checkpoint.rs`.

use std::time::Duration;

use super::state::{ContainerLock, ContainerState, Status};
use super::{core, Result, Runtime, RuntimeError, LOCK_TIMEOUT};

impl Runtime {
    /// Loads the state of an existing container for a command that does not hold
    /// its lock (state, list, ps, events, workflows). A checkpoint whose stasis
    /// died is recovered (`recover`) when the lock is free at this moment;
    /// otherwise the state is returned as recorded.
    pub fn load(&self, id: &str) -> Result<ContainerState> {
        let st = self.load_raw(id)?;
        match &st.checkpointer {
            Some(c) if !c.stasis_alive() => {}
            _ => return Ok(st),
        }
        let Ok(lock) = ContainerLock::acquire(&self.root, id, Duration::ZERO) else {
            return Ok(st);
        };
        match self.load_locked(id, &lock) {
            Ok((st, _)) => Ok(st),
            // Recovery is best effort here: a command holding the lock retries it.
            Err(_) => self.load_raw(id),
        }
    }

    /// Loads the state of a container whose lock `_lock` this command holds,
    /// first recovering from an interrupted checkpoint. Returns the state and
    /// whether a dead checkpointer's freeze was undone.
    pub(super) fn load_locked(
        &self,
        id: &str,
        _lock: &ContainerLock,
    ) -> Result<(ContainerState, bool)> {
        let mut st = self.load_raw(id)?;
        let recovered = self.recover(&mut st)?;
        Ok((st, recovered))
    }

    /// Undoes what a checkpointer that died left behind (the caller holds the
    /// container's lock): once its CRIU has exited too (CRIU rolls a dump back
    /// when stasis stops answering and re-freezes the cgroup it found frozen),
    /// thaws the container if the checkpointer froze it (a container the user
    /// paused stays paused) and clears the record. Returns true when it thawed.
    fn recover(&self, st: &mut ContainerState) -> Result<bool> {
        let Some(c) = st.checkpointer.clone() else {
            return Ok(false);
        };
        // Under the lock a live recorded checkpointer can only be this process,
        // whose checkpoint is over (it released the lock).
        if c.stasis_alive() && c.pid != std::process::id() as i32 {
            return Ok(false);
        }
        let t0 = std::time::Instant::now();
        while c.criu_alive() {
            if t0.elapsed() >= LOCK_TIMEOUT {
                return Err(RuntimeError::CheckpointerBusy {
                    id: st.id.clone(),
                    criu_pid: c.criu_pid,
                    waited: LOCK_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let dir = self.dir(&st.id);
        let thaw = c.freezes && st.status == Status::Running;
        if thaw {
            if let Err(e) = core::set_frozen(&dir, &st.id, false) {
                // A container whose tasks are gone has nothing to thaw.
                if st.live_status() != Status::Stopped {
                    return Err(e);
                }
            }
        }
        st.checkpointer = None;
        st.save(&dir)?;
        Ok(thaw)
    }
}
