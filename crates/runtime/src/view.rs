//! What a sandbox is, as every front end shows it: one state vocabulary and
//! one view. `airlock ls`/`inspect` (directly) and the daemon's API (which
//! adds what only it knows: owner, labels, exec counts) print this shape.

use std::time::{Duration, UNIX_EPOCH};

use airlock_policy::Tier;
use serde::{Deserialize, Serialize};

use crate::state::{SandboxDir, SandboxMeta, SandboxState};

/// The states every front end reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Creating,
    Running,
    /// The command ended, or the sandbox was stopped (`exit` says how).
    Stopped,
    /// airlock failed, or the supervisor died (`lost`).
    Failed,
}

impl State {
    pub const ALL: [State; 4] = [State::Creating, State::Running, State::Stopped, State::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Creating => "creating",
            State::Running => "running",
            State::Stopped => "stopped",
            State::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// State from the metadata and the supervisor's lock (`live`), and
    /// whether the supervisor was lost: a sandbox whose metadata says it runs
    /// while nobody holds its lock is `failed` with `lost` set. `creating`:
    /// a creation is known to be under way (metadata may not exist yet).
    pub fn of(meta: Option<&SandboxMeta>, live: bool, creating: bool) -> (State, bool) {
        match meta.map(|m| m.state) {
            None if live || creating => (State::Creating, false),
            None => (State::Failed, false),
            Some(SandboxState::Creating) if live || creating => (State::Creating, false),
            Some(SandboxState::Running) if live => (State::Running, false),
            Some(SandboxState::Creating | SandboxState::Running) => (State::Failed, true),
            Some(SandboxState::Exited | SandboxState::Stopped) => (State::Stopped, false),
            Some(SandboxState::Failed) => (State::Failed, false),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExitView {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub oom_killed: bool,
}

fn process_tier() -> Tier {
    Tier::Process
}

/// What list and inspect show.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxView {
    pub name: String,
    pub state: State,
    /// The supervisor died without finishing the sandbox.
    pub lost: bool,
    pub policy: String,
    /// `process` or `microvm`.
    #[serde(default = "process_tier")]
    pub tier: Tier,
    pub workspace: Option<String>,
    pub workspace_mode: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub exit: Option<ExitView>,
    /// Published ports (`create -p`): each host address and the port
    /// inside its connections go to. Listening while the sandbox runs.
    #[serde(default)]
    pub ports: Vec<crate::ports::PortMapping>,
    /// The OCI image its root came from (reference and resolved digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<crate::image::ImageMeta>,
    /// Its container engine's socket on the host, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containers: Option<ContainersView>,
    /// What only inspect shows.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Detail>,
}

/// A sandbox's container engine, as the host reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainersView {
    /// `unix://` + this is a `DOCKER_HOST`.
    pub socket: String,
}

/// What only inspect shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Detail {
    #[serde(default)]
    pub limits: Option<serde_json::Value>,
    /// When the sandbox will be stopped (RFC 3339, UTC), while it runs.
    #[serde(default)]
    pub deadline: Option<String>,
    #[serde(default)]
    pub deadline_unix: Option<u64>,
    #[serde(default)]
    pub idle_timeout_secs: Option<u64>,
    #[serde(default)]
    pub degraded: Vec<String>,
    #[serde(default)]
    pub supervisor_pid: Option<i32>,
    #[serde(default)]
    pub applied_at: Option<String>,
}

impl SandboxView {
    /// The view of sandbox `name` from its metadata (none while it is being
    /// created) and its state.
    pub fn of(name: &str, meta: Option<&SandboxMeta>, (state, lost): (State, bool)) -> SandboxView {
        SandboxView {
            name: name.to_owned(),
            state,
            lost,
            policy: meta.map(|m| m.policy.clone()).unwrap_or_default(),
            tier: meta.map_or(Tier::Process, |m| m.tier),
            workspace: meta.and_then(|m| m.workspace.as_ref()).map(|p| p.to_string_lossy().into_owned()),
            workspace_mode: meta.map(|m| m.workspace_mode.clone()),
            created_at: meta.map(|m| m.created_at.clone()).unwrap_or_default(),
            started_at: meta.and_then(|m| m.started_at.clone()),
            finished_at: meta.and_then(|m| m.finished_at.clone()),
            exit: meta.and_then(|m| m.exit).map(|e| ExitView {
                code: e.code,
                signal: e.signal,
                timed_out: e.timed_out,
                oom_killed: e.oom_killed,
            }),
            ports: meta.map(|m| m.ports.clone()).unwrap_or_default(),
            image: meta.and_then(|m| m.image.clone()),
            containers: meta
                .filter(|_| state == State::Running)
                .and_then(|m| m.containers_socket.as_ref())
                .map(|s| ContainersView { socket: s.to_string_lossy().into_owned() }),
            detail: None,
        }
    }
}

/// What the daemon adds to the view: it alone keeps an index of owners,
/// labels and execs. (`airlock inspect` directly shows a sandbox's labels
/// from its metadata; its JSON is the view alone.)
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DaemonFacts {
    #[serde(default)]
    pub owner_uid: Option<u32>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Execs ever started (inspect only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execs_total: Option<u64>,
    /// Execs running now (inspect only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execs_running: Option<u64>,
}

/// Processes of a running sandbox, as its supervisor counts them.
pub struct LiveStatus {
    pub execs_running: u64,
}

impl Detail {
    /// The detail inspect adds. Blocks: it reads the stored policy and asks
    /// a running sandbox's supervisor for its current deadline.
    pub fn read(
        dir: &SandboxDir,
        meta: Option<&SandboxMeta>,
        state: State,
        live: bool,
    ) -> (Detail, Option<LiveStatus>) {
        let limits = airlock_policy::Policy::load_file(&dir.policy_path()).ok().map(|p| {
            serde_json::json!({
                "timeout_secs": p.limits.timeout.as_secs(),
                "memory": p.limits.memory,
                "pids": p.limits.pids,
                "cpus": p.limits.cpus,
                "disk": p.limits.disk,
                "nofile": p.limits.nofile,
                "log_size": p.limits.log_size,
                "audit_size": p.limits.audit_size,
            })
        });
        let mut deadline_unix = meta.and_then(|m| m.deadline_unix);
        let mut idle_timeout_secs = meta.and_then(|m| m.idle_timeout_secs);
        let running = state == State::Running;
        let mut status = None;
        if running
            && let Ok(client) = crate::supervisor::SupervisorClient::connect(dir)
            && let Ok(airlock_proto::supervisor::Reply::Status {
                deadline_unix: d,
                idle_timeout_secs: i,
                execs_running: r,
                ..
            }) = client.status()
        {
            deadline_unix = Some(d);
            idle_timeout_secs = i;
            status = Some(LiveStatus { execs_running: u64::from(r) });
        }
        let deadline_unix = deadline_unix.filter(|_| running);
        let detail = Detail {
            limits,
            deadline: deadline_unix.map(|s| crate::audit::rfc3339_utc(UNIX_EPOCH + Duration::from_secs(s))),
            deadline_unix,
            idle_timeout_secs,
            degraded: meta.map(|m| m.degraded.clone()).unwrap_or_default(),
            supervisor_pid: meta.and_then(|m| m.supervisor_pid).filter(|_| live),
            applied_at: meta.and_then(|m| m.applied_at.clone()),
        };
        (detail, status)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn meta(state: SandboxState) -> SandboxMeta {
        let mut meta: SandboxMeta = serde_json::from_value(serde_json::json!({
            "name": "x", "created_at": "t0", "policy": "dev", "workspace": "/w",
            "workspace_mode": "overlay", "command": [], "state": "running", "supervisor_pid": null,
            "host_uid": null, "cgroup": null, "started_at": null, "finished_at": null,
            "exit": {"code": 3, "signal": null, "timed_out": false, "oom_killed": true},
            "applied_at": null, "degraded": []
        }))
        .unwrap();
        meta.state = state;
        meta
    }

    #[test]
    fn the_view_says_the_tier_and_metadata_from_before_tiers_is_process() {
        let old = meta(SandboxState::Running);
        assert_eq!(old.tier, Tier::Process, "metadata without a tier");
        let view = SandboxView::of("x", Some(&old), (State::Running, false));
        assert_eq!(serde_json::to_value(&view).unwrap()["tier"], "process");
        assert_eq!(serde_json::to_value(&view).unwrap()["ports"], serde_json::json!([]));
        let mut vm = old.clone();
        vm.tier = Tier::Microvm;
        let view = SandboxView::of("x", Some(&vm), (State::Running, false));
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["tier"], "microvm");
        // A view from a daemon that predates the field reads as process.
        let mut older = json.clone();
        older.as_object_mut().unwrap().remove("tier");
        assert_eq!(serde_json::from_value::<SandboxView>(older).unwrap().tier, Tier::Process);
    }

    #[test]
    fn states_from_meta_and_lock() {
        use State::*;
        assert_eq!(State::of(None, false, true), (Creating, false));
        assert_eq!(State::of(None, true, false), (Creating, false));
        assert_eq!(State::of(None, false, false), (Failed, false));
        assert_eq!(State::of(Some(&meta(SandboxState::Creating)), true, false), (Creating, false));
        assert_eq!(State::of(Some(&meta(SandboxState::Creating)), false, true), (Creating, false));
        assert_eq!(State::of(Some(&meta(SandboxState::Running)), true, false), (Running, false));
        assert_eq!(State::of(Some(&meta(SandboxState::Running)), false, false), (Failed, true));
        assert_eq!(State::of(Some(&meta(SandboxState::Creating)), false, false), (Failed, true));
        assert_eq!(State::of(Some(&meta(SandboxState::Exited)), false, false), (Stopped, false));
        assert_eq!(State::of(Some(&meta(SandboxState::Stopped)), false, false), (Stopped, false));
        assert_eq!(State::of(Some(&meta(SandboxState::Failed)), false, false), (Failed, false));
        assert_eq!(State::parse("stopped"), Some(Stopped));
        assert_eq!(State::parse("exited"), None);
        assert_eq!(State::parse("lost"), None);
    }

    #[test]
    fn the_view_serializes_one_vocabulary_and_reads_back() {
        let m = meta(SandboxState::Exited);
        let view = SandboxView::of("x", Some(&m), State::of(Some(&m), false, false));
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["state"], "stopped");
        assert_eq!(json["lost"], false);
        assert_eq!(json["exit"]["code"], 3);
        assert_eq!(json["exit"]["oom_killed"], true);
        assert_eq!(json["workspace"], "/w");
        assert!(json.get("deadline").is_none(), "list views carry no inspect detail: {json}");
        let mut with_detail = view.clone();
        with_detail.detail = Some(Detail { deadline_unix: Some(5), ..Detail::default() });
        let json = serde_json::to_value(&with_detail).unwrap();
        assert_eq!(json["deadline_unix"], 5);
        let back: SandboxView = serde_json::from_value(json).unwrap();
        assert_eq!(back.state, State::Stopped);
        assert_eq!(back.detail.unwrap().deadline_unix, Some(5));
    }
}
