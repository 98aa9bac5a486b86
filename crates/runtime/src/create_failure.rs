//! Why creating a long-lived sandbox failed, in a form that crosses the
//! supervisor's fork with its kind intact.
//!
//! The supervisor's child decides most of what can go wrong (the host probe,
//! the name, the launch), but its creator is another process: it reports
//! one JSON line ([`Report`]) instead of text, and [`create`] turns it back
//! into the [`RunError`] a direct `airlock run` would have returned, so the
//! CLI prints the same message and the daemon answers the same status.
//!
//! [`create`]: crate::supervisor::create

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::RunError;
use crate::state::StateError;

/// The kinds of creation failure a creator tells apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CreateFailure {
    /// The host lacks a feature the policy requires (or its tier).
    HostUnsupported { message: String, feature: Option<String>, policy: Option<String> },
    /// A sandbox of this name exists already.
    NameTaken { name: String, path: PathBuf },
    /// The policy (or an override of it) is invalid.
    BadPolicy { message: String },
    /// The workspace cannot be used.
    BadWorkspace { message: String },
    /// A published port's host address could not be listened on (taken).
    PortUnavailable { message: String },
    /// The image's pull would pass the image store's disk budget.
    ImageStoreFull { message: String },
    /// The sandbox cannot run as the user asked for (`--user`).
    BadUser { message: String },
    /// Anything else: the sandbox could not be started.
    Other { message: String },
}

/// The one line the supervisor writes to its creator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    Ready { name: String },
    Failed(CreateFailure),
}

impl Report {
    /// One line of JSON, newline included.
    pub fn to_line(&self) -> String {
        // Serializing an enum of strings and paths cannot fail; should it,
        // the creator still learns that something did.
        let mut line = serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"failed\":{{\"kind\":\"other\",\"message\":\"{e}\"}}}}"));
        line.push('\n');
        line
    }

    /// What the creator read; text that is no report is itself a failure.
    pub fn from_line(line: &str) -> Report {
        let line = line.trim();
        serde_json::from_str(line).unwrap_or_else(|_| {
            Report::Failed(CreateFailure::Other {
                message: format!("sandbox supervisor: it ended without saying why ({line:?})"),
            })
        })
    }
}

impl From<&RunError> for CreateFailure {
    fn from(e: &RunError) -> CreateFailure {
        let message = e.to_string();
        match e {
            RunError::HostLacks { feature, policy } => CreateFailure::HostUnsupported {
                message,
                feature: Some(feature.clone()),
                policy: Some(policy.clone()),
            },
            RunError::HostUnsupported(_) => {
                CreateFailure::HostUnsupported { message, feature: None, policy: None }
            }
            RunError::Vm(vm) if vm.is_host_unsupported() => {
                CreateFailure::HostUnsupported { message, feature: None, policy: None }
            }
            RunError::StateDir(StateError::Exists { name, path }) => {
                CreateFailure::NameTaken { name: name.clone(), path: path.clone() }
            }
            RunError::Policy(_) | RunError::PolicyRefused(_) => CreateFailure::BadPolicy { message },
            RunError::WorkspaceDir(..) | RunError::WorkspaceIsRoot | RunError::WorkspaceRefused(_) => {
                CreateFailure::BadWorkspace { message }
            }
            RunError::Ports(crate::ports::PortError::Bind { .. }) | RunError::PortUnavailable(_) => {
                CreateFailure::PortUnavailable { message }
            }
            RunError::UserRefused(_) => CreateFailure::BadUser { message },
            e if e.is_image_store_full() => CreateFailure::ImageStoreFull { message },
            _ => CreateFailure::Other { message },
        }
    }
}

impl From<CreateFailure> for RunError {
    /// The error `airlock run` would have returned, or one that prints the
    /// same message and has the same kind.
    fn from(f: CreateFailure) -> RunError {
        match f {
            CreateFailure::HostUnsupported { feature: Some(feature), policy: Some(policy), .. } => {
                RunError::HostLacks { feature, policy }
            }
            CreateFailure::HostUnsupported { message, .. } => RunError::HostUnsupported(message),
            CreateFailure::NameTaken { name, path } => RunError::StateDir(StateError::Exists { name, path }),
            CreateFailure::BadPolicy { message } => RunError::PolicyRefused(message),
            CreateFailure::BadWorkspace { message } => RunError::WorkspaceRefused(message),
            CreateFailure::PortUnavailable { message } => RunError::PortUnavailable(message),
            CreateFailure::ImageStoreFull { message } => RunError::ImageStoreFull(message),
            CreateFailure::BadUser { message } => RunError::UserRefused(message),
            CreateFailure::Other { message } => RunError::CreateFailed(message),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// What the creator rebuilds from the line the supervisor wrote.
    fn across(e: RunError) -> RunError {
        let line = Report::Failed(CreateFailure::from(&e)).to_line();
        assert!(line.ends_with('\n') && !line.trim_end().contains('\n'), "{line:?}");
        match Report::from_line(&line) {
            Report::Failed(f) => f.into(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_missing_host_feature_comes_back_as_itself() {
        let e = RunError::HostLacks { feature: "cgroups".into(), policy: "ci".into() };
        let message = e.to_string();
        let back = across(e);
        assert!(
            matches!(&back, RunError::HostLacks { feature, policy } if feature == "cgroups" && policy == "ci")
        );
        assert_eq!(back.to_string(), message);
    }

    #[test]
    fn each_kind_keeps_its_kind_and_message() {
        let tier = RunError::Vm(airlock_vm::VmError::NoQemu);
        let message = tier.to_string();
        let back = across(tier);
        assert!(matches!(back, RunError::HostUnsupported(_)));
        assert_eq!(back.to_string(), message);

        let taken = RunError::StateDir(StateError::Exists { name: "ci".into(), path: "/state/ci".into() });
        let message = taken.to_string();
        let back = across(taken);
        assert!(matches!(&back, RunError::StateDir(StateError::Exists { name, .. }) if name == "ci"));
        assert_eq!(back.to_string(), message);

        let policy = RunError::from(airlock_policy::Policy::resolve("/nonexistent/policy.toml").unwrap_err());
        let message = policy.to_string();
        let back = across(policy);
        assert!(matches!(back, RunError::PolicyRefused(_)));
        assert_eq!(back.to_string(), message);

        let workspace = RunError::WorkspaceIsRoot;
        let message = workspace.to_string();
        let back = across(workspace);
        assert!(matches!(back, RunError::WorkspaceRefused(_)));
        assert_eq!(back.to_string(), message);

        let taken = RunError::Ports(crate::ports::PortError::Bind {
            addr: "127.0.0.1:8080".parse().unwrap(),
            source: std::io::Error::from_raw_os_error(libc::EADDRINUSE),
        });
        let message = taken.to_string();
        let back = across(taken);
        assert!(matches!(back, RunError::PortUnavailable(_)));
        assert_eq!(back.to_string(), message);

        let full = RunError::Image(Box::new(airlock_image::source::SourceError::Store(
            airlock_image::store::StoreError::OverBudget { budget: 1 << 20, used: 1 << 19, wanted: 1 << 20 },
        )));
        let message = full.to_string();
        let back = across(full);
        assert!(matches!(back, RunError::ImageStoreFull(_)) && back.is_image_store_full());
        assert_eq!(back.to_string(), message);

        let user = RunError::UserRefused("user 70000 is outside the sandbox's ids".into());
        let back = across(user);
        assert!(matches!(&back, RunError::UserRefused(m) if m.contains("70000")));

        let other = RunError::SetupFailed("mount: no\nspace".into());
        let message = other.to_string();
        let back = across(other);
        assert!(matches!(back, RunError::CreateFailed(_)));
        assert_eq!(back.to_string(), message);
    }

    #[test]
    fn ready_and_garbage_lines() {
        let line = Report::Ready { name: "quiet-otter".into() }.to_line();
        assert_eq!(line, "{\"ready\":{\"name\":\"quiet-otter\"}}\n");
        assert_eq!(Report::from_line(&line), Report::Ready { name: "quiet-otter".into() });
        match Report::from_line("") {
            Report::Failed(CreateFailure::Other { message }) => {
                assert!(message.contains("without saying why"))
            }
            other => panic!("{other:?}"),
        }
        let wire = Report::Failed(CreateFailure::BadPolicy { message: "x".into() }).to_line();
        assert_eq!(wire, "{\"failed\":{\"kind\":\"bad_policy\",\"message\":\"x\"}}\n");
    }
}
