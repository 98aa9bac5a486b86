//! `airlock files …`: the typed file operations on a running sandbox, from
//! the command line. Direct, through `runtime::files`; with a daemon,
//! through its files API. Both print the same view (`runtime::files::view`)
//! with one renderer: names from inside are quoted and escaped, `--json`
//! is the API's exact shape.

use std::io::Write;

use airlock_runtime::files::{self, view};
use clap::Subcommand;
use hyper::Method;

use super::daemon_client::{self, Daemon};
use super::{CliResult, running, sandbox_path, state};

#[derive(Subcommand)]
pub(crate) enum FilesCommand {
    /// List a directory: `files ls NAME:/dir`. Symlinks are listed, not followed.
    Ls {
        target: String,
        /// How many levels to descend (1: the directory's own entries).
        #[arg(long, default_value_t = 1)]
        depth: u32,
        /// At most this many entries (the rest is reported as left out).
        #[arg(long)]
        max: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Describe a path itself (a symlink is described, not followed).
    Stat {
        target: String,
        #[arg(long)]
        json: bool,
    },
    /// Make a directory.
    Mkdir {
        /// Make the missing parents too; an existing directory is no error.
        #[arg(short, long)]
        parents: bool,
        /// Permission bits, in octal (default 755).
        #[arg(long, value_parser = parse_octal)]
        mode: Option<u32>,
        target: String,
    },
    /// Remove a file, a symlink (never what it points to) or an empty directory.
    Rm {
        /// A directory and everything below it (following no symlink).
        #[arg(short, long)]
        recursive: bool,
        target: String,
    },
    /// Rename: `files mv NAME:/from /to` (both inside the sandbox).
    Mv {
        /// Refuse when the destination exists, instead of replacing it.
        #[arg(long)]
        no_replace: bool,
        source: String,
        destination: String,
    },
    /// Print what changes in a directory, one line per event, until interrupted.
    Watch {
        /// The directories below it too.
        #[arg(short, long)]
        recursive: bool,
        #[arg(long)]
        json: bool,
        target: String,
    },
}

fn parse_octal(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(mode) if mode <= 0o7777 => Ok(mode),
        _ => Err(format!("{s:?}: expected permission bits in octal, such as 755")),
    }
}

/// `NAME:/path`, or why not.
fn target(arg: &str) -> Result<(&str, &str), Box<dyn std::error::Error>> {
    sandbox_path(arg).ok_or_else(|| format!("{arg}: expected NAME:/absolute/path").into())
}

impl FilesCommand {
    fn sandbox(&self) -> &str {
        match self {
            FilesCommand::Ls { target, .. }
            | FilesCommand::Stat { target, .. }
            | FilesCommand::Mkdir { target, .. }
            | FilesCommand::Rm { target, .. }
            | FilesCommand::Watch { target, .. } => target,
            FilesCommand::Mv { source, .. } => source,
        }
    }
}

/// The destination of `mv`: a path, or the same sandbox's `NAME:/path`.
fn destination<'a>(name: &str, arg: &'a str) -> Result<&'a str, Box<dyn std::error::Error>> {
    match sandbox_path(arg) {
        Some((other, path)) if other == name => Ok(path),
        Some(_) => Err("files mv renames inside one sandbox; copy between sandboxes with cp".into()),
        None if arg.starts_with('/') => Ok(arg),
        None => Err(format!("{arg}: expected an absolute path in the sandbox").into()),
    }
}

fn print_entries(entries: &[view::Entry], truncated: bool, json: bool) -> CliResult {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(
            &mut out,
            &serde_json::json!({ "entries": entries, "truncated": truncated }),
        )?;
        writeln!(out)?;
    } else {
        for entry in entries {
            writeln!(out, "{}", entry.line())?;
        }
        if truncated {
            eprintln!("airlock: more entries were left out; raise --max or list a smaller directory");
        }
    }
    Ok(0)
}

fn print_entry(entry: &view::Entry, json: bool) -> CliResult {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, entry)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{}", entry.line())?;
    }
    Ok(0)
}

/// One watch line; false once stdout is gone (the reader went away).
fn print_watch(line: &view::WatchLine, json: bool) -> bool {
    let mut out = std::io::stdout().lock();
    let text = if json { serde_json::to_string(line).unwrap_or_default() } else { line.line() };
    writeln!(out, "{text}").and_then(|()| out.flush()).is_ok()
}

fn base_name(path: &str) -> &[u8] {
    path.trim_end_matches('/').rsplit('/').next().filter(|b| !b.is_empty()).unwrap_or("/").as_bytes()
}

pub(crate) fn direct(command: FilesCommand) -> CliResult {
    let (name, path) = target(command.sandbox())?;
    let client = running(&state()?, name)?;
    match &command {
        FilesCommand::Ls { depth, max, json, .. } => {
            let listing = files::list(&client, path, *depth, *max)?;
            let entries: Vec<view::Entry> =
                listing.entries.into_iter().map(|e| view::entry(&e.name, e.info)).collect();
            print_entries(&entries, listing.truncated, *json)
        }
        FilesCommand::Stat { json, .. } => {
            print_entry(&view::entry(base_name(path), files::stat(&client, path)?), *json)
        }
        FilesCommand::Mkdir { parents, mode, .. } => {
            files::mkdir(&client, path, *parents, *mode).map(|()| 0).map_err(Into::into)
        }
        FilesCommand::Rm { recursive, .. } => {
            files::remove(&client, path, *recursive).map(|()| 0).map_err(Into::into)
        }
        FilesCommand::Mv { no_replace, destination: to, .. } => {
            files::rename(&client, path, destination(name, to)?, !no_replace).map(|()| 0).map_err(Into::into)
        }
        FilesCommand::Watch { recursive, json, .. } => {
            let mut first = true;
            files::watch(&client, path, *recursive, &mut |event| match event {
                Some(event) => print_watch(&view::WatchLine::from(event), *json),
                None if first => {
                    first = false;
                    print_watch(&view::WatchLine::watching(), *json)
                }
                None => true,
            })?;
            Ok(0)
        }
    }
}

pub(crate) fn through_daemon(daemon: &Daemon, command: FilesCommand) -> CliResult {
    let (name, path) = target(command.sandbox())?;
    let url = |route: &str, query: &[(&str, String)]| {
        let query: Vec<String> =
            query.iter().map(|(k, v)| format!("{k}={}", daemon_client::encode(v))).collect();
        format!("/v1/sandboxes/{}/files{route}?{}", daemon_client::encode(name), query.join("&"))
    };
    let p = || ("path", path.to_owned());
    match &command {
        FilesCommand::Ls { depth, max, json, .. } => {
            let mut query = vec![p(), ("depth", depth.to_string())];
            if let Some(max) = max {
                query.push(("max_entries", max.to_string()));
            }
            let answer = daemon.json(Method::GET, &url("/list", &query), None)?;
            let entries: Vec<view::Entry> = serde_json::from_value(answer["entries"].clone())?;
            print_entries(&entries, answer["truncated"] == true, *json)
        }
        FilesCommand::Stat { json, .. } => {
            let entry: view::Entry =
                serde_json::from_value(daemon.json(Method::GET, &url("/stat", &[p()]), None)?)?;
            print_entry(&entry, *json)
        }
        FilesCommand::Mkdir { parents, mode, .. } => {
            let mut query = vec![p(), ("parents", parents.to_string())];
            if let Some(mode) = mode {
                query.push(("mode", format!("{mode:o}")));
            }
            daemon.json(Method::POST, &url("/mkdir", &query), None)?;
            Ok(0)
        }
        FilesCommand::Rm { recursive, .. } => {
            daemon.json(Method::DELETE, &url("", &[p(), ("recursive", recursive.to_string())]), None)?;
            Ok(0)
        }
        FilesCommand::Mv { no_replace, destination: to, .. } => {
            let query = [
                ("from", path.to_owned()),
                ("to", destination(name, to)?.to_owned()),
                ("replace", (!no_replace).to_string()),
            ];
            daemon.json(Method::POST, &url("/rename", &query), None)?;
            Ok(0)
        }
        FilesCommand::Watch { recursive, json, .. } => {
            let route = url("/watch", &[p(), ("recursive", recursive.to_string())]);
            let result = daemon.lines(Method::GET, &route, None, &mut |line| {
                let parsed: view::WatchLine = serde_json::from_str(line)
                    .map_err(|e| daemon_client::DaemonError::Protocol(format!("a watch line: {e}")))?;
                if print_watch(&parsed, *json) {
                    Ok(())
                } else {
                    Err(daemon_client::DaemonError::Protocol("stdout closed".into()))
                }
            });
            result?;
            Ok(0)
        }
    }
}
