//! The process tree, from the audit log's process events, whatever their
//! kind: an event with an `argv` starts a process (with `pid`, and `ppid`
//! when the exec trace knows it; `cwd` and `path` when given); an event
//! with a `pid` and an exit status (`code` or `exit`, or `signal`) ends
//! the process of that pid. airlock's own commands are matched by what
//! they carry: `exec_ended` by the exec's `id`, `exited` to the command of
//! `airlock run`.
//!
//! A start whose pid is already running is that process replacing its
//! program (execve keeps the pid): it is shown below the one it replaced.
//! A parent the log never showed starting (the sandbox's PID 1, or events
//! dropped from a full log) makes a process a root.

use std::collections::HashMap;

use serde_json::Value;

use crate::events::{ending, field, kind, number, seq, ts};
use crate::text::command_line;

/// One process start, with its end once seen.
#[derive(Debug)]
pub(crate) struct Process {
    pub seq: Option<u64>,
    pub ts: String,
    pub kind: String,
    pub pid: Option<i64>,
    pub ppid: Option<i64>,
    pub command: String,
    pub cwd: Option<String>,
    pub path: Option<String>,
    /// How it ended, and whether that was a success.
    pub ended: Option<(String, bool)>,
    pub duration_ms: Option<u64>,
    pub end_seq: Option<u64>,
    parent: Option<usize>,
    children: Vec<usize>,
}

#[derive(Debug, Default)]
pub(crate) struct Tree {
    nodes: Vec<Process>,
    roots: Vec<usize>,
    /// Process starts past the cap, not in the tree.
    pub omitted: usize,
}

impl Tree {
    /// The tree of `events`' processes, at most `cap` of them.
    pub(crate) fn build(events: &[Value], cap: usize) -> Tree {
        let mut tree = Tree::default();
        let mut live: HashMap<i64, usize> = HashMap::new();
        let mut by_id: HashMap<i64, usize> = HashMap::new();
        let mut commands: Vec<usize> = Vec::new();
        for v in events {
            let kind = kind(v);
            // A PATH search's miss (the exec trace marks it): the kernel
            // refused it, so no program replaced the caller's.
            if v.get("no_such_file").and_then(Value::as_bool) == Some(true) {
                continue;
            }
            if let Some(argv) = v.get("argv") {
                if tree.nodes.len() >= cap {
                    tree.omitted += 1;
                    continue;
                }
                let pid = number(v, "pid");
                let ppid = number(v, "ppid");
                let replaced = pid.and_then(|p| live.get(&p).copied()).filter(|&at| {
                    let before = tree.nodes[at].ppid;
                    ppid.is_none() || before.is_none() || before == ppid
                });
                let parent = replaced.or_else(|| ppid.and_then(|p| live.get(&p).copied()));
                let at = tree.nodes.len();
                tree.nodes.push(Process {
                    seq: seq(v),
                    ts: ts(v),
                    kind: kind.clone(),
                    pid,
                    ppid,
                    command: command_line(argv),
                    cwd: field(v, "cwd"),
                    path: field(v, "path"),
                    ended: None,
                    duration_ms: None,
                    end_seq: None,
                    parent,
                    children: Vec::new(),
                });
                match parent {
                    Some(p) => tree.nodes[p].children.push(at),
                    None => tree.roots.push(at),
                }
                if let Some(pid) = pid {
                    live.insert(pid, at);
                }
                if let Some(id) = number(v, "id") {
                    by_id.insert(id, at);
                }
                if kind == "command_started" {
                    commands.push(at);
                }
                continue;
            }
            let Some(end) = ending(v) else { continue };
            let target = if kind == "exited" {
                commands.pop()
            } else if let Some(pid) = number(v, "pid") {
                live.remove(&pid)
            } else if let Some(id) = number(v, "id") {
                by_id.remove(&id)
            } else {
                None
            };
            if let Some(at) = target {
                tree.end(at, end, v);
                if let Some(pid) = tree.nodes[at].pid
                    && live.get(&pid) == Some(&at)
                {
                    live.remove(&pid);
                }
            }
        }
        tree
    }

    /// Ends `at` and the programs of the same pid it replaced.
    fn end(&mut self, mut at: usize, end: (String, bool), v: &Value) {
        let pid = self.nodes[at].pid;
        loop {
            let node = &mut self.nodes[at];
            if node.ended.is_none() {
                node.ended = Some(end.clone());
                node.duration_ms = v.get("duration_ms").and_then(Value::as_u64);
                node.end_seq = seq(v);
            }
            match self.nodes[at].parent {
                Some(p) if pid.is_some() && self.nodes[p].pid == pid && self.nodes[p].ended.is_none() => {
                    at = p
                }
                _ => break,
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Every process in tree order (a parent before its children, siblings
    /// in the order they started), with its depth.
    pub(crate) fn rows(&self) -> Vec<(usize, &Process)> {
        let mut out = Vec::with_capacity(self.nodes.len());
        // An explicit stack: a chain of thousands of nested shells must not
        // exhaust the thread's stack.
        let mut stack: Vec<(usize, usize)> = self.roots.iter().rev().map(|&r| (r, 0)).collect();
        while let Some((at, depth)) = stack.pop() {
            let node = &self.nodes[at];
            out.push((depth, node));
            stack.extend(node.children.iter().rev().map(|&c| (c, depth + 1)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn shape(tree: &Tree) -> Vec<String> {
        tree.rows()
            .iter()
            .map(|(depth, p)| {
                let end = p.ended.as_ref().map(|(how, _)| format!(" [{how}]")).unwrap_or_default();
                format!("{}{}{end}", "  ".repeat(*depth), p.command)
            })
            .collect()
    }

    #[test]
    fn airlocks_own_commands_are_roots_ended_by_id_and_by_exited() {
        let events = vec![
            json!({"seq": 1, "event": "created"}),
            json!({"seq": 2, "event": "command_started", "argv": ["make"], "pid": 2}),
            json!({"seq": 3, "event": "exec_started", "id": 1, "argv": ["ls"], "pid": 9}),
            json!({"seq": 4, "event": "exec_ended", "id": 1, "code": 0, "signal": null, "duration_ms": 4}),
            json!({"seq": 5, "event": "egress_proxy_ended", "code": 1, "signal": null}),
            json!({"seq": 6, "event": "exited", "code": 2, "signal": null, "duration_ms": 50}),
        ];
        let tree = Tree::build(&events, 100);
        assert_eq!(shape(&tree), ["make [exit 2]", "ls [exit 0]"]);
        let rows = tree.rows();
        assert_eq!(rows[0].1.end_seq, Some(6));
        assert_eq!(rows[1].1.duration_ms, Some(4));
    }

    #[test]
    fn traced_execs_nest_by_parent_pid_and_exec_in_place() {
        // exec #1 runs `sh -c …` as pid 5; the trace sees sh itself, a
        // child shell that forks a background job, and the job's program.
        let events = vec![
            json!({"event": "exec_started", "id": 1, "argv": ["sh", "-c", "x"], "pid": 5}),
            json!({"event": "exec", "pid": 5, "ppid": 1, "argv": ["sh", "-c", "x"], "cwd": "/w"}),
            json!({"event": "exec", "pid": 6, "ppid": 5, "argv": ["sh", "inner.sh"]}),
            json!({"event": "exec", "pid": 7, "ppid": 6, "argv": ["sleep", "1"]}),
            json!({"event": "exec", "pid": 8, "ppid": 5, "argv": ["true"]}),
            json!({"event": "process_exec", "pid": 8, "ppid": 5, "argv": ["x"], "no_such_file": true}),
            json!({"event": "exec_end", "pid": 8, "exit": 0, "duration_ms": 1}),
            json!({"event": "exec_end", "pid": 6, "exit": 0}),
            json!({"event": "exec_end", "pid": 7, "signal": 15}),
            json!({"event": "exec_end", "pid": 5, "exit": 0}),
            json!({"event": "exec_ended", "id": 1, "code": 0, "signal": null}),
        ];
        let tree = Tree::build(&events, 100);
        assert_eq!(
            shape(&tree),
            [
                "sh -c x [exit 0]",
                "  sh -c x [exit 0]",
                "    sh inner.sh [exit 0]",
                "      sleep 1 [killed by signal 15 (SIGTERM)]",
                "    true [exit 0]",
            ]
        );
    }

    #[test]
    fn a_reused_pid_with_another_parent_is_a_new_process() {
        let events = vec![
            json!({"event": "exec", "pid": 10, "ppid": 1, "argv": ["a"]}),
            json!({"event": "exec", "pid": 11, "ppid": 1, "argv": ["b"]}),
            // 10's end was never recorded; its pid comes back under 11.
            json!({"event": "exec", "pid": 10, "ppid": 11, "argv": ["c"]}),
        ];
        assert_eq!(shape(&Tree::build(&events, 100)), ["a", "b", "  c"]);
    }

    #[test]
    fn the_cap_counts_what_it_leaves_out_and_deep_chains_are_fine() {
        let mut events = Vec::new();
        for pid in 2..20_002 {
            events.push(json!({"event": "exec", "pid": pid, "ppid": pid - 1, "argv": ["sh"]}));
        }
        let tree = Tree::build(&events, 15_000);
        assert_eq!((tree.len(), tree.omitted), (15_000, 5_000));
        let rows = tree.rows();
        assert_eq!(rows.last().unwrap().0, 14_999);
    }
}
