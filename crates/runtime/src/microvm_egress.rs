//! The egress of a microVM run: the same proxy process, policy, secrets
//! and audit log as the process tier's (`network::Network`), reached over
//! the guest's egress port (`airlock_vm::egress_port`) instead of a
//! descriptor channel into a network namespace.
//!
//! The proxy needs what a process-tier sandbox has around it: a sandbox
//! directory whose `audit.jsonl` its decisions go to (so `airlock net log
//! NAME` reads them), and, as root, an id block (the proxy's own uid
//! derives from it). So a microVM run whose policy gives it egress keeps
//! a sandbox directory — `meta.json`, `policy.toml`, the audit log and the
//! trust bundle — held and cleaned up as `airlock run` does; one without
//! egress leaves none.

use std::time::Duration;

use airlock_egress::redact::Redactor;
use airlock_policy::{CleanupAction, Policy};
use airlock_proto::Stream;
use airlock_vm::egress_port::HostEgress;
use airlock_vm::run::OutputFilter;

use crate::audit::{AuditEvent, AuditLog};
use crate::idblocks::{IdBlock, Registry};
use crate::network::Network;
use crate::state::{ExitInfo, LiveLock, SandboxDir, SandboxMeta, SandboxState, StateRoot};
use crate::{RunError, now_rfc3339};

/// A microVM run's sandbox directory and egress proxy. Dropped without
/// [`VmEgress::finish`], the proxy is killed, the id block given back and
/// the sandbox recorded as failed.
pub(crate) struct VmEgress {
    sandbox: SandboxDir,
    live: Option<LiveLock>,
    meta: SandboxMeta,
    audit: AuditLog,
    network: Option<Network>,
    id_block: Option<IdBlock>,
    finished: bool,
}

impl VmEgress {
    /// Creates the sandbox's directory and starts its proxy, when the
    /// policy gives it egress; `None` when it has no network at all.
    pub(crate) fn start(
        policy: &Policy,
        name: &str,
        command: &[String],
    ) -> Result<Option<VmEgress>, RunError> {
        if !policy.network.has_egress() {
            return Ok(None);
        }
        let is_root = rustix::process::geteuid().is_root();
        crate::state::check_name_owner(name, rustix::process::getuid().as_raw())?;
        let root = StateRoot::from_env()?;
        crate::prepare_state_root(&root, is_root)?;
        let sandbox = root.create_sandbox(Some(name))?;
        let live = Some(sandbox.lock_live()?);
        std::fs::write(sandbox.policy_path(), policy.to_toml())
            .map_err(|e| RunError::State(sandbox.policy_path(), e))?;
        let meta = SandboxMeta {
            name: name.to_owned(),
            created_at: now_rfc3339(),
            policy: policy.name.clone(),
            workspace: None,
            workspace_mode: "none".into(),
            command: command.to_vec(),
            state: SandboxState::Creating,
            supervisor_pid: Some(std::process::id() as i32),
            host_uid: None,
            id_block: None,
            cgroup: None,
            started_at: None,
            finished_at: None,
            exit: None,
            applied_at: None,
            degraded: Vec::new(),
            owner_uid: Some(rustix::process::getuid().as_raw()),
            labels: Default::default(),
            deadline_unix: None,
            idle_timeout_secs: None,
        };
        sandbox.write_meta(&meta)?;
        let audit = AuditLog::open(&sandbox.audit_path())?.with_limit(policy.limits.audit_size);
        let mut this =
            VmEgress { sandbox, live, meta, audit, network: None, id_block: None, finished: false };
        this.audit.record(AuditEvent::Created {
            policy: policy.name.clone(),
            workspace: None,
            workspace_mode: "none".into(),
            limits: crate::limits_json(policy),
            degraded: Vec::new(),
        })?;
        if is_root {
            let block = Registry::host()?.allocate(this.sandbox.path())?;
            this.meta.host_uid = Some(block.first_host_uid());
            this.meta.id_block = Some(block.index());
            this.id_block = Some(block);
            this.sandbox.write_meta(&this.meta)?;
        }
        let first_uid = this.meta.host_uid.unwrap_or_else(|| rustix::process::getuid().as_raw());
        this.network =
            Network::start(policy, name, this.sandbox.path(), &this.sandbox.audit_path(), first_uid, None)?;
        Ok(Some(this))
    }

    /// The proxy settings, trust bundle paths and secret placeholders, as
    /// the process tier's sandbox gets them.
    pub(crate) fn environment(&self) -> Vec<(String, String)> {
        self.network.as_ref().map(Network::environment).unwrap_or_default()
    }

    /// Waits for the proxy, then gives what the guest's egress port is
    /// served with: the proxy's hand-over channel and the trust bundle.
    pub(crate) fn host_egress(&mut self) -> Result<HostEgress, RunError> {
        let network = self.network.as_mut().ok_or_else(|| RunError::Egress("no egress proxy".into()))?;
        network.wait_ready()?;
        let handover =
            network.agent_end.take().ok_or_else(|| RunError::Egress("no egress channel".into()))?;
        let bundle =
            std::fs::read(&network.bundle).map_err(|e| RunError::State(network.bundle.clone(), e))?;
        self.meta.state = SandboxState::Running;
        self.meta.started_at = Some(now_rfc3339());
        self.sandbox.write_meta(&self.meta)?;
        let secrets = network.secret_values();
        let output: Option<Box<dyn OutputFilter>> = (!secrets.is_empty()).then(|| {
            Box::new(Redacted { stdout: Redactor::new(&secrets), stderr: Redactor::new(&secrets) })
                as Box<dyn OutputFilter>
        });
        Ok(HostEgress { handover, bundle, output })
    }

    /// The run ended (the VM is gone): the proxy's last events are
    /// recorded, then how it ended, then the policy's cleanup rule (or
    /// `--rm`). Whether the directory was removed.
    pub(crate) fn finish(
        mut self,
        policy: &Policy,
        ended: Result<(i32, bool), &RunError>,
        duration: Duration,
        remove_after: bool,
    ) -> Result<bool, RunError> {
        if let Some(network) = self.network.take() {
            network.stop();
        }
        self.finished = true;
        // Its only user, the proxy, is gone, and the guest wrote no host
        // file: the block goes back now, whether the directory stays or not.
        drop(self.id_block.take());
        self.meta.id_block = None;
        let (exit_code, timed_out) = match ended {
            Ok(ended) => ended,
            Err(error) => {
                self.audit.record(AuditEvent::Error { stage: "run".into(), message: error.to_string() })?;
                self.meta.state = SandboxState::Failed;
                self.meta.finished_at = Some(now_rfc3339());
                self.sandbox.write_meta(&self.meta)?;
                return Ok(false);
            }
        };
        if timed_out {
            self.audit.record(AuditEvent::TimeLimitHit { limit_secs: policy.limits.timeout.as_secs() })?;
        }
        self.audit.record(AuditEvent::Exited {
            code: Some(exit_code),
            signal: None,
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            oom_killed: false,
        })?;
        self.meta.state = SandboxState::Exited;
        self.meta.finished_at = Some(now_rfc3339());
        self.meta.exit = Some(ExitInfo { code: Some(exit_code), signal: None, timed_out, oom_killed: false });
        self.sandbox.write_meta(&self.meta)?;
        let action = if exit_code == 0 { policy.cleanup.on_success } else { policy.cleanup.on_failure };
        if !remove_after && action != CleanupAction::Remove {
            return Ok(false);
        }
        self.audit.record(AuditEvent::Removed {
            reason: if remove_after {
                "--rm".into()
            } else {
                format!("cleanup rule of policy {}", policy.name)
            },
        })?;
        drop(self.live.take());
        crate::lifecycle::remove_sandbox_dir(&self.sandbox, None)?;
        Ok(true)
    }
}

/// The guest's output with the secrets' values redacted, as the process
/// tier's (`stdio`), each stream on its own.
struct Redacted {
    stdout: Redactor,
    stderr: Redactor,
}

impl Redacted {
    fn of(&mut self, stream: Stream) -> &mut Redactor {
        match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        }
    }
}

impl OutputFilter for Redacted {
    fn filter(&mut self, stream: Stream, data: &[u8]) -> Vec<u8> {
        self.of(stream).feed(data)
    }

    fn finish(&mut self, stream: Stream) -> Vec<u8> {
        self.of(stream).finish()
    }
}

impl Drop for VmEgress {
    fn drop(&mut self) {
        if let Some(network) = self.network.take() {
            network.abort();
        }
        if !self.finished {
            self.meta.state = SandboxState::Failed;
            self.meta.finished_at = Some(now_rfc3339());
            let _ = self.sandbox.write_meta(&self.meta);
        }
        // A block not kept is given back here (its proxy is gone).
        drop(self.id_block.take());
    }
}

#[cfg(test)]
mod tests {
    use airlock_egress::proxy::Port;
    use airlock_vm::egress_port as port;

    /// The guest listens where the process tier's agent does and tags its
    /// connections as the proxy expects them.
    #[test]
    fn the_guest_uses_the_process_tiers_ports_and_tags() {
        assert_eq!(port::HTTP_PORT, airlock_egress::HTTP_PROXY_PORT);
        assert_eq!(port::SOCKS_PORT, airlock_egress::SOCKS_PROXY_PORT);
        assert!(matches!(Port::from_tag(port::HTTP_TAG), Some(Port::Http)));
        assert!(matches!(Port::from_tag(port::SOCKS_TAG), Some(Port::Socks)));
        assert_eq!(port::GUEST_CA_BUNDLE, crate::network::SANDBOX_CA_BUNDLE);
        assert_eq!(port::GUEST_SYSTEM_BUNDLE, crate::network::SYSTEM_CA_BUNDLE);
    }
}
