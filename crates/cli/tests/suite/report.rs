//! `airlock report` in a real browser: Debian's Chromium, headless
//! (scripts/test.sh installs it). A sandbox runs commands, changes files
//! (one named `<script>alert(1)</script>.txt`) and makes an allowed and a
//! denied request; its report must load with nothing on the console (no
//! script error, no blocked fetch, no policy violation), show those rows,
//! keep every hostile name as text, and filter its timeline. A screenshot
//! and the page are left under the target directory for a person to look at.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::egress::{EchoServer, needs_clients, write_policy};
use super::support::*;

const HOSTILE_NAME: &str = "<script>alert(1)</script>.txt";

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"].into_iter().map(PathBuf::from).find(|p| p.exists())
}

/// Runs headless Chromium on `url` with `what` (`--dump-dom`,
/// `--screenshot=…`), its console sent to stderr; kills it after 90 s.
fn browse(chromium: &Path, profile: &Path, url: &str, what: &[&str]) -> Output {
    let mut cmd = Command::new(chromium);
    cmd.args([
        "--headless",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--enable-logging=stderr",
        "--v=0",
    ]);
    // Chromium will not start as root with its own sandbox on, and CI runs
    // as root. Only this test's browser goes without it: it loads nothing
    // but the report file (the page's policy forbids every fetch) and the
    // test's own pages.
    if is_root() {
        cmd.arg("--no-sandbox");
    }
    cmd.arg(format!("--user-data-dir={}", profile.display())).args(what).arg(url);
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let (out, err) = (read(Box::new(stdout)), read(Box::new(stderr)));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            panic!("chromium did not finish within 90 s on {url}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

/// The page's console messages (Chromium logs each as `…:CONSOLE…] "text"`
/// at any level: errors, uncaught exceptions, blocked fetches and policy
/// violations included).
fn console(o: &Output) -> Vec<String> {
    stderr(o).lines().filter(|l| l.contains(":CONSOLE")).map(str::to_owned).collect()
}

/// The `data-kind` of every timeline row, and whether it is hidden.
fn timeline_rows(dom: &str) -> Vec<(String, bool)> {
    dom.split("<tr id=\"ev-")
        .skip(1)
        .map(|row| {
            let tag = row.split('>').next().unwrap_or("");
            let kind = tag.split("data-kind=\"").nth(1).and_then(|k| k.split('"').next()).unwrap_or("");
            (kind.to_owned(), tag.contains(" hidden"))
        })
        .collect()
}

/// The text of the table with id `id` in the DOM, up to its end.
fn table<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no #{id} in the page"));
    let rest = &dom[start..];
    &rest[..rest.find("</table>").unwrap_or(rest.len())]
}

#[test]
fn report_renders_in_chromium_with_the_sandboxs_rows_and_no_hostile_markup() {
    if !require(chromium().is_some(), "chromium (Debian's package; scripts/test.sh installs it)") {
        return;
    }
    if !needs_clients() {
        return;
    }
    let chromium = chromium().unwrap();
    let env = Env::new();
    let profile = env.dir.path().join("chromium-profile");

    // The check is only as good as its detection: a page that logs an error
    // must be seen to do so.
    let control = env.dir.path().join("control.html");
    std::fs::write(&control, "<!DOCTYPE html><p>x</p><script>console.error('deliberate-control')</script>")
        .unwrap();
    let o = browse(&chromium, &profile, &format!("file://{}", control.display()), &["--dump-dom"]);
    assert!(
        console(&o).iter().any(|l| l.contains("deliberate-control")),
        "console not captured:\n{}",
        show(&o)
    );

    let server = EchoServer::http();
    let p = server.port;
    let policy = write_policy(
        &env,
        "report.toml",
        &format!("extends = \"dev\"\n[network]\nallow = [\"127.0.0.1:{p}\"]\n"),
    );
    let o = env.airlock(["create", "--name", "rep", "--policy", policy.to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let exec = |script: &str| {
        let o = env.airlock(["exec", "rep", "--", "sh", "-c", script]).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{script}\n{}", show(&o));
        o
    };
    // The name holds a `/`: a directory `<script>alert(1)<` and in it a
    // file `script>.txt`, shown as the one path.
    exec(&format!(
        "echo changed >> README && mkdir -p '<script>alert(1)<' && echo x > '{HOSTILE_NAME}' && \
         printf 'def main():\\n    return \"hi\"  # greet\\n' > src/app.py"
    ));
    let o = exec(&format!(
        "curl -sS --max-time 10 http://127.0.0.1:{p}/allowed-path; \
         curl -sS --max-time 10 -o /dev/null http://example.net/denied-path; true"
    ));
    assert!(stdout(&o).contains("GET /allowed-path"), "the allowed request went through:\n{}", show(&o));
    exec("sh -c 'ls / > /dev/null' & wait");
    let o = env.airlock(["stop", "rep"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));

    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-test");
    std::fs::create_dir_all(&out_dir).unwrap();
    let page = out_dir.join("report.html");
    let o = env.airlock(["report", "rep", "-o", page.to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;/script&gt;.txt"),
        "the hostile name is in the page, escaped"
    );

    let url = format!("file://{}", page.display());
    let o = browse(&chromium, &profile, &url, &["--dump-dom"]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(console(&o), Vec::<String>::new(), "the page wrote to the console");
    let dom = stdout(&o);

    // The script ran (allowed by its hash) and showed the filters.
    assert!(dom.contains("<html lang=\"en\" data-ready=\"1\">"), "the page's script did not run:\n{dom}");
    assert!(dom.contains("<div id=\"filters\">"), "the filters stay hidden");

    // The hostile file name is text: one script element on the page (ours),
    // and the name shown escaped in the file list and its diff.
    assert_eq!(dom.matches("<script").count(), 1, "{dom}");
    assert!(!dom.contains("<script>alert"), "{dom}");
    let escaped = HOSTILE_NAME.replace('<', "&lt;").replace('>', "&gt;");
    assert!(
        dom.matches(&escaped).count() >= 3,
        "the name in the list, the diff's header and its lines:\n{dom}"
    );

    // The rows a reviewer looks for.
    let rows = timeline_rows(&dom);
    let count = |kind: &str| rows.iter().filter(|(k, _)| k == kind).count();
    assert_eq!((count("created"), count("exec_started"), count("exec_ended")), (1, 3, 3), "{rows:?}");
    assert!(count("network") >= 2 && count("stopped") == 1 && count("diff_summary") == 1, "{rows:?}");
    assert!(rows.iter().all(|(_, hidden)| !hidden), "everything shows at first");

    let network = table(&dom, "network-rows");
    assert!(network.contains(&format!("127.0.0.1:{p}")) && network.contains("/allowed-path"), "{network}");
    assert!(network.contains("example.net:80") && network.contains("/denied-path"), "{network}");
    assert!(network.contains(">allowed<") && network.contains(">denied<"), "{network}");
    assert!(dom.contains("no allow entry matches example.net:80"), "the rule that denied");

    let processes = &dom[dom.find("id=\"processes\"").unwrap()..dom.find("id=\"changes\"").unwrap()];
    assert_eq!(processes.matches("exec_started").count(), 3, "{processes}");
    assert!(processes.contains("curl -sS --max-time 10") && processes.contains("exit 0"), "{processes}");

    let changes = &dom[dom.find("id=\"changes\"").unwrap()..dom.find("id=\"network\"").unwrap()];
    assert!(changes.contains(">README<") && changes.contains(">src/app.py<"), "{changes}");
    assert!(changes.contains("<span class=\"l add\">+changed</span>"), "{changes}");
    assert!(changes.contains("<span class=\"k\">def</span>"), "python keywords coloured:\n{changes}");
    assert!(changes.contains("<span class=\"c\"># greet</span>"), "python comments coloured:\n{changes}");
    assert!(dom.contains("id=\"policy\"") && dom.contains("extends"), "the resolved policy");

    // Filtering by kind, from the address: only network rows stay.
    let o = browse(&chromium, &profile, &format!("{url}#kinds=network"), &["--dump-dom"]);
    assert_eq!(console(&o), Vec::<String>::new(), "{}", show(&o));
    let rows = timeline_rows(&stdout(&o));
    assert!(rows.iter().any(|(k, _)| k == "network"));
    for (kind, hidden) in &rows {
        assert_eq!(*hidden, kind != "network", "{kind} row hidden={hidden} with #kinds=network");
    }

    // A picture for a person.
    let shot = out_dir.join("report.png");
    let _ = std::fs::remove_file(&shot);
    let o = browse(
        &chromium,
        &profile,
        &url,
        &["--window-size=1400,2400", &format!("--screenshot={}", shot.display())],
    );
    assert!(o.status.success() && shot.metadata().is_ok_and(|m| m.len() > 10_000), "{}", show(&o));
    assert_eq!(console(&o), Vec::<String>::new());
    eprintln!("report screenshot: {}", shot.display());
    eprintln!("report page: {}", page.display());

    let o = env.airlock(["rm", "rep"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
}
