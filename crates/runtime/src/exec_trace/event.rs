//! The exec trace's records (`airlock_proto::exec_record`) held to the
//! audit log's caps where they are recorded: what a listener sends was
//! read from a sandbox and is capped where it is read, and once more here.

use airlock_proto::exec_record::{ProcessExec, ProcessExecSummary, recap, recap_list};

use crate::caps::{MAX_FIELD, cap_str};

/// A record cut to the audit log's caps.
pub(crate) trait Capped {
    fn capped(self) -> Self;
}

impl Capped for ProcessExec {
    fn capped(self) -> ProcessExec {
        ProcessExec {
            at: cap_str(&self.at, MAX_FIELD),
            syscall: cap_str(&self.syscall, MAX_FIELD),
            path: self.path.map(recap),
            argv: recap_list(self.argv),
            cwd: self.cwd.map(recap),
            unreadable: self.unreadable.map(|u| cap_str(&u, MAX_FIELD)),
            reported_by: self.reported_by.map(|r| cap_str(&r, MAX_FIELD)),
            ..self
        }
    }
}

impl Capped for ProcessExecSummary {
    fn capped(mut self) -> ProcessExecSummary {
        self.programs.truncate(16);
        for p in &mut self.programs {
            p.path = recap(std::mem::take(&mut p.path));
        }
        self
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use airlock_proto::exec_record::Claimed;

    use super::*;
    use crate::caps::MAX_LIST_BYTES;

    #[test]
    fn a_hostile_tracer_cannot_make_a_record_larger_than_the_caps() {
        let exec = ProcessExec {
            at: "x".repeat(5000),
            pid: 2,
            ppid: 1,
            syscall: "execve".into(),
            path: Some(Claimed(vec![b'p'; 50_000])),
            argv: (0..10_000).map(|_| Claimed(vec![b'a'; 900])).collect(),
            argc: 10_000,
            cwd: Some(Claimed(vec![0xff; 9000])),
            unreadable: None,
            no_such_file: false,
            reported_by: None,
        }
        .capped();
        let json = serde_json::to_string(&exec).unwrap();
        assert!(json.len() < 3 * MAX_LIST_BYTES, "{}", json.len());
        assert!(exec.argv.last().unwrap().0.starts_with("…[cut by airlock:".as_bytes()));
    }

    #[test]
    fn the_audit_log_redacts_secret_values_from_what_was_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let secrets = vec![("TOKEN".to_string(), b"s3cr3t-value".to_vec())];
        let mut log = crate::audit::AuditLog::open(&path).unwrap().redacting(&secrets);
        let exec = ProcessExec {
            at: String::new(),
            pid: 3,
            ppid: 1,
            syscall: "execve".into(),
            path: Some("/usr/bin/curl".into()),
            argv: vec![
                "curl".into(),
                "Authorization: Bearer s3cr3t-value".into(),
                Claimed(b"\xff s3cr3t-value".to_vec()),
            ],
            argc: 3,
            cwd: Some("/work/s3cr3t-value".into()),
            unreadable: None,
            no_such_file: false,
            reported_by: None,
        };
        log.record(crate::audit::AuditEvent::ProcessExec(exec)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("s3cr3t-value"), "{text}");
        let hex: String = b"s3cr3t-value".iter().map(|b| format!("{b:02x}")).collect();
        assert!(!text.contains(&hex), "{text}");
        assert!(text.contains("[REDACTED:TOKEN]"), "{text}");
    }
}
