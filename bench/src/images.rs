//! Images: how long a first pull of a ~100 MiB image takes, against
//! `skopeo copy` + `umoci unpack` doing the same job, and what running on a
//! cached image adds to a sandbox's start against the host's own root.
//!
//! The image is built here: busybox and its applet links in one layer,
//! pseudo-random files (half random bytes, half compressible text) in
//! three more, gzip-compressed and packed by hand as an OCI image layout.
//! It is served by a real registry on loopback (Debian's
//! `docker-registry`, plain HTTP), pushed there with skopeo. The pull
//! cases run interleaved, each with an empty store or destination every
//! time; the same pull from the layout itself (`oci:DIR:TAG`) is measured
//! beside `umoci unpack` of it, which needs no registry.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::report::{self, LABEL_W};
use crate::{BenchError, Case, Options, Outcome, Slot, fixtures, measure};

/// airlock's first pull may take at most this many times the best peer's.
pub const MAX_PULL_RATIO: f64 = 1.2;
/// A sandbox on a cached image may start at most this much later than one
/// on the host's root.
pub const MAX_ADDED_START: Duration = Duration::from_millis(2);

const BUSYBOX: &str = "/bin/busybox";
const TAG: &str = "bench";
const REPOSITORY: &str = "bench/image";

pub struct ImageResults {
    /// Why nothing was measured, if so.
    pub skipped: Option<String>,
    pub image_mib: u64,
    pub compressed_bytes: u64,
    pub pull_runs: usize,
    /// Registry pulls: airlock, then skopeo copy + umoci unpack.
    pub registry: Option<(Outcome, Outcome)>,
    /// Pulls from the layout: airlock, then umoci unpack.
    pub layout: (Outcome, Outcome),
    /// Sandbox start: host root, then the cached image.
    pub start: (Outcome, Outcome),
    /// Where the start case's image came from.
    pub start_source: &'static str,
}

impl ImageResults {
    pub fn failed(&self) -> bool {
        let failed = |o: &Outcome| matches!(o, Outcome::Failed(_));
        self.registry.as_ref().is_some_and(|(a, _)| failed(a))
            || failed(&self.layout.0)
            || failed(&self.start.1)
    }

    fn skipped(why: String) -> ImageResults {
        let none = || Outcome::Skipped(why.clone());
        ImageResults {
            skipped: Some(why.clone()),
            image_mib: 0,
            compressed_bytes: 0,
            pull_runs: 0,
            registry: None,
            layout: (none(), none()),
            start: (none(), none()),
            start_source: "",
        }
    }
}

pub struct Plan {
    pub image_mib: u64,
    pub pull_iterations: usize,
    pub warmup: usize,
    pub iterations: usize,
}

pub fn run(
    airlock: &Path,
    scratch: &Path,
    plan: &Plan,
    opts: &Options,
    notes: &mut Vec<String>,
) -> ImageResults {
    match run_inner(airlock, scratch, plan, opts, notes) {
        Ok(r) => r,
        Err(e) => ImageResults::skipped(e.to_string()),
    }
}

fn run_inner(
    airlock: &Path,
    scratch: &Path,
    plan: &Plan,
    opts: &Options,
    notes: &mut Vec<String>,
) -> Result<ImageResults, BenchError> {
    fixtures::make_dir_0755(scratch)?;
    let busybox = std::fs::read(BUSYBOX)
        .map_err(|e| BenchError::new(format!("{BUSYBOX}: {e} (Debian: busybox-static)")))?;
    let layout = scratch.join("layout");
    eprintln!("airlock-bench: images, building a {} MiB image in {}", plan.image_mib, layout.display());
    let started = Instant::now();
    let compressed_bytes = build_layout(&layout, &busybox, plan.image_mib)?;
    eprintln!(
        "airlock-bench: images, built ({:.1} MiB compressed) in {}",
        compressed_bytes as f64 / f64::from(1 << 20),
        report::secs(started.elapsed())
    );
    let umoci = fixtures::find_in_path("umoci");
    let skopeo = fixtures::find_in_path("skopeo");
    let registry_bin = fixtures::find_in_path("docker-registry");
    let pull_opts = Options { iterations: plan.pull_iterations, warmup: plan.warmup.min(1), ..opts.clone() };
    let layout_source = format!("oci:{}:{TAG}", layout.display());

    // From a registry on loopback, if it starts and takes the image.
    let registry = match (&skopeo, &umoci, &registry_bin) {
        (Some(skopeo), Some(umoci), Some(bin)) => match Registry::start(bin, &scratch.join("registry")) {
            Ok(registry) => {
                let reference = format!("{}/{REPOSITORY}:{TAG}", registry.address);
                push(skopeo, &layout, &reference)?;
                Some((registry, reference, skopeo.clone(), umoci.clone()))
            }
            Err(e) => {
                notes.push(format!("{e}: the registry pull rows are skipped"));
                None
            }
        },
        _ => {
            let missing: Vec<&str> =
                [("skopeo", &skopeo), ("umoci", &umoci), ("docker-registry", &registry_bin)]
                    .into_iter()
                    .filter_map(|(name, found)| found.is_none().then_some(name))
                    .collect();
            notes.push(format!("{} not installed: the registry pull rows are skipped", missing.join(", ")));
            None
        }
    };
    let registry_outcomes = registry.as_ref().map(|(_, reference, skopeo, umoci)| {
        eprintln!("airlock-bench: images, first pull from the registry, 2 cases interleaved");
        let peer_root = scratch.join("peer-registry");
        let slots = vec![
            Slot::Run(airlock_pull_case(
                airlock,
                &scratch.join("state-pull-registry"),
                reference,
                Some(&registry_address(reference)),
            )),
            Slot::Run(peer_registry_case(skopeo, umoci, reference, &peer_root)),
        ];
        pair(crate::measure_interleaved(slots, &pull_opts))
    });

    eprintln!("airlock-bench: images, first pull from the OCI layout, 2 cases interleaved");
    let layout_slots = vec![
        Slot::Run(airlock_pull_case(airlock, &scratch.join("state-pull-layout"), &layout_source, None)),
        match &umoci {
            Some(umoci) => Slot::Run(peer_layout_case(umoci, &layout, &scratch.join("peer-layout"))),
            None => Slot::Done(Outcome::Skipped("umoci is not installed".into())),
        },
    ];
    let layout_outcomes = pair(crate::measure_interleaved(layout_slots, &pull_opts));

    // The start cases share one state directory, where the image is pulled
    // once beforehand: from the registry where that pull worked, else from
    // the layout.
    let state = scratch.join("state-start");
    let registry_pulled = registry_outcomes.as_ref().is_some_and(|(a, _)| a.summary().is_some());
    let (start_image, start_source) = match &registry {
        Some((_, reference, ..)) if registry_pulled => (reference.clone(), "registry"),
        _ => (layout_source.clone(), "OCI layout"),
    };
    let mut pull = Command::new(airlock);
    pull.env("AIRLOCK_STATE_DIR", &state).args(["image", "pull"]);
    if start_source == "registry" {
        pull.args(["--insecure", "--allow", &registry_address(&start_image)]);
    }
    pull.arg(&start_image);
    let start = match measure::checked(pull, "airlock image pull (for the start cases)") {
        Ok(_) => {
            eprintln!(
                "airlock-bench: images, sandbox start on the host root and on the cached image, interleaved"
            );
            let slots = vec![
                Slot::Run(start_case(airlock, &state, scratch, None)),
                Slot::Run(start_case(airlock, &state, scratch, Some(&start_image))),
            ];
            pair(crate::measure_interleaved(slots, &Options { iterations: plan.iterations, ..opts.clone() }))
        }
        Err(e) => (Outcome::Skipped("no cached image".into()), Outcome::Failed(e.to_string())),
    };
    drop(registry);
    Ok(ImageResults {
        skipped: None,
        image_mib: plan.image_mib,
        compressed_bytes,
        pull_runs: plan.pull_iterations,
        registry: registry_outcomes,
        layout: layout_outcomes,
        start,
        start_source,
    })
}

fn pair(outcomes: Vec<Outcome>) -> (Outcome, Outcome) {
    let mut it = outcomes.into_iter();
    let mut next = || it.next().unwrap_or_else(|| Outcome::Failed("not measured".into()));
    (next(), next())
}

/// The `HOST:PORT` a registry reference names: the loopback registry is
/// a private address, which a pull's egress rules allow only by its port.
fn registry_address(reference: &str) -> String {
    reference.split_once('/').map_or(reference, |(address, _)| address).to_owned()
}

/// `airlock image pull` into an empty store each time: the store is pruned
/// (untimed) after every run. From a registry (`allow` names it) over plain
/// HTTP, allowed through the pull's egress rules as a sandbox's egress is.
fn airlock_pull_case(airlock: &Path, state: &Path, source: &str, allow: Option<&str>) -> Case {
    let (airlock, state, source) = (airlock.to_path_buf(), state.to_path_buf(), source.to_owned());
    let allow = allow.map(str::to_owned);
    let label = if allow.is_some() {
        "airlock image pull --insecure (registry)".to_string()
    } else {
        "airlock image pull oci:LAYOUT:TAG".to_string()
    };
    let (prune_airlock, prune_state) = (airlock.clone(), state.clone());
    Case {
        label,
        make: Box::new(move |_| {
            let mut c = Command::new(&airlock);
            c.env("AIRLOCK_STATE_DIR", &state).args(["image", "pull"]);
            if let Some(allow) = &allow {
                c.args(["--insecure", "--allow", allow]);
            }
            c.arg(&source);
            c
        }),
        after: Some(Box::new(move |_| {
            let mut prune = Command::new(&prune_airlock);
            prune.env("AIRLOCK_STATE_DIR", &prune_state).args(["image", "prune"]);
            if let Err(e) = measure::checked(prune, "airlock image prune") {
                eprintln!("airlock-bench: {e}");
            }
        })),
    }
}

/// The peer: `skopeo copy` from the registry into a new OCI layout, then
/// `umoci unpack` of it into a new bundle; both removed after each run.
fn peer_registry_case(skopeo: &Path, umoci: &Path, reference: &str, root: &Path) -> Case {
    let (skopeo, umoci, root) = (skopeo.to_path_buf(), umoci.to_path_buf(), root.to_path_buf());
    let reference = reference.to_owned();
    let tidy = root.clone();
    Case {
        label: "skopeo copy docker://… oci:… + umoci unpack".to_string(),
        make: Box::new(move |i| {
            let _ = std::fs::create_dir_all(&root);
            let layout = root.join(format!("layout-{i}"));
            let bundle = root.join(format!("bundle-{i}"));
            let script = "\"$1\" copy --quiet --src-tls-verify=false \"docker://$3\" \"oci:$4:bench\" \
                          && \"$2\" unpack --image \"$4:bench\" \"$5\"";
            let mut c = Command::new("/bin/sh");
            c.args(["-c", script, "sh"]).arg(&skopeo).arg(&umoci).arg(&reference).arg(&layout).arg(&bundle);
            c
        }),
        after: Some(Box::new(move |_| remove_tree(&tidy))),
    }
}

/// The peer from the layout: `umoci unpack` of it into a new bundle.
fn peer_layout_case(umoci: &Path, layout: &Path, root: &Path) -> Case {
    let (umoci, layout, root) = (umoci.to_path_buf(), layout.to_path_buf(), root.to_path_buf());
    let tidy = root.clone();
    Case {
        label: "umoci unpack --image LAYOUT:TAG".to_string(),
        make: Box::new(move |i| {
            let _ = std::fs::create_dir_all(&root);
            let mut c = Command::new(&umoci);
            let image = format!("{}:{TAG}", layout.display());
            c.args(["unpack", "--image", &image]).arg(root.join(format!("bundle-{i}")));
            c
        }),
        after: Some(Box::new(move |_| remove_tree(&tidy))),
    }
}

fn start_case(airlock: &Path, state: &Path, cwd: &Path, image: Option<&str>) -> Case {
    let (airlock, state, cwd) = (airlock.to_path_buf(), state.to_path_buf(), cwd.to_path_buf());
    let image = image.map(str::to_owned);
    let label = match &image {
        None => "airlock run --rm --mode none -- true (host root)".to_string(),
        Some(_) => "… --image IMAGE (cached) -- true".to_string(),
    };
    Case {
        label,
        make: Box::new(move |_| {
            let mut c = Command::new(&airlock);
            c.env("AIRLOCK_STATE_DIR", &state).current_dir(&cwd).args(["run", "--rm", "--mode", "none"]);
            if let Some(image) = &image {
                c.args(["--image", image]);
            }
            c.args(["--", "true"]);
            c
        }),
        after: None,
    }
}

fn remove_tree(path: &Path) {
    if let Err(e) = std::fs::remove_dir_all(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("airlock-bench: cannot remove {}: {e}", path.display());
    }
}

/// Pushes the layout's image to the registry, as a user would.
fn push(skopeo: &Path, layout: &Path, reference: &str) -> Result<(), BenchError> {
    let mut c = Command::new(skopeo);
    c.args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{TAG}", layout.display()))
        .arg(format!("docker://{reference}"));
    measure::checked(c, "skopeo copy (push to the local registry)").map(|_| ())
}

/// Debian's `docker-registry` on a free loopback port, storing under
/// `dir`; stopped when dropped.
struct Registry {
    child: Child,
    address: String,
}

impl Registry {
    fn start(bin: &Path, dir: &Path) -> Result<Registry, BenchError> {
        let err = |what: &str, e: std::io::Error| BenchError::new(format!("docker-registry: {what}: {e}"));
        fixtures::make_dir_0755(dir)?;
        let port = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| err("no free port", e))?
            .port();
        let config = dir.join("config.yml");
        let storage = dir.join("storage");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
            ),
        )
        .map_err(|e| err("config", e))?;
        let log = std::fs::File::create(dir.join("registry.log")).map_err(|e| err("log", e))?;
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| err("cannot start", e))?;
        let registry = Registry { child, address: format!("127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if registry.answers() {
                return Ok(registry);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(BenchError::new(format!(
            "docker-registry did not answer on {} within 10 s (its log: {})",
            registry.address,
            dir.join("registry.log").display()
        )))
    }

    /// `GET /v2/` answers 200 once the registry serves.
    fn answers(&self) -> bool {
        use std::io::Read;
        let Ok(mut stream) = TcpStream::connect(&self.address) else { return false };
        let request = format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.address);
        let mut reply = [0u8; 12];
        stream.write_all(request.as_bytes()).is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && reply.starts_with(b"HTTP/1.")
            && &reply[9..12] == b"200"
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes the image as an OCI layout at `dir` (tagged [`TAG`]) and returns
/// the size of its compressed layers.
fn build_layout(dir: &Path, busybox: &[u8], mib: u64) -> Result<u64, BenchError> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(|e| BenchError::new(format!("{}: {e}", blobs.display())))?;
    let mut layers = vec![busybox_layer(busybox)?];
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let data_layers = 3u64;
    let per_layer = mib * (1 << 20) / data_layers;
    for n in 0..data_layers {
        layers.push(data_layer(&mut rng, n, per_layer)?);
    }
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    let mut compressed_total = 0u64;
    for tar in &layers {
        diff_ids.push(sha256(tar));
        let gz = gzip(tar)?;
        compressed_total += gz.len() as u64;
        descriptors.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": put_blob(dir, &gz)?,
            "size": gz.len(),
        }));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .map_err(json_err)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": put_blob(dir, &config)?,
            "size": config.len(),
        },
        "layers": descriptors,
    }))
    .map_err(json_err)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": put_blob(dir, &manifest)?,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": TAG},
        }],
    });
    write(&dir.join("index.json"), &serde_json::to_vec(&index).map_err(json_err)?)?;
    write(&dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(compressed_total)
}

fn busybox_layer(busybox: &[u8]) -> Result<Vec<u8>, BenchError> {
    let mut tar = tar::Builder::new(Vec::new());
    for dir in ["bin", "etc", "tmp", "proc", "dev"] {
        append_dir(&mut tar, dir)?;
    }
    append_file(&mut tar, "bin/busybox", 0o755, busybox)?;
    for applet in ["sh", "true", "cat", "ls", "echo", "env"] {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_mode(0o777);
        header.set_size(0);
        tar.append_link(&mut header, format!("bin/{applet}"), "busybox").map_err(tar_err)?;
    }
    tar.into_inner().map_err(tar_err)
}

/// About `bytes` of files from 4 KiB to 4 MiB, each half random bytes and
/// half repeated text, so gzip has something to do and not everything.
fn data_layer(rng: &mut XorShift, n: u64, bytes: u64) -> Result<Vec<u8>, BenchError> {
    let mut tar = tar::Builder::new(Vec::new());
    let top = format!("data{n}");
    append_dir(&mut tar, &top)?;
    let mut left = bytes;
    let mut file = 0u64;
    while left > 0 {
        if file.is_multiple_of(64) {
            append_dir(&mut tar, &format!("{top}/d{}", file / 64))?;
        }
        let size = (4096u64 << (rng.next() % 11)).min(left);
        let mut data = vec![0u8; usize::try_from(size).unwrap_or(usize::MAX)];
        let half = data.len() / 2;
        for chunk in data[..half].chunks_mut(8) {
            let word = rng.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        for (i, b) in data[half..].iter_mut().enumerate() {
            *b = b"the quick brown fox jumps over the lazy dog\n"[i % 44];
        }
        append_file(&mut tar, &format!("{top}/d{}/f{file}", file / 64), 0o644, &data)?;
        left -= size;
        file += 1;
    }
    tar.into_inner().map_err(tar_err)
}

fn append_dir(tar: &mut tar::Builder<Vec<u8>>, name: &str) -> Result<(), BenchError> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_size(0);
    tar.append_data(&mut header, name, std::io::empty()).map_err(tar_err)
}

fn append_file(
    tar: &mut tar::Builder<Vec<u8>>,
    name: &str,
    mode: u32,
    data: &[u8],
) -> Result<(), BenchError> {
    let mut header = tar::Header::new_gnu();
    header.set_mode(mode);
    header.set_size(data.len() as u64);
    tar.append_data(&mut header, name, data).map_err(tar_err)
}

fn tar_err(e: std::io::Error) -> BenchError {
    BenchError::new(format!("building a layer: {e}"))
}

fn json_err(e: serde_json::Error) -> BenchError {
    BenchError::new(format!("building the image's JSON: {e}"))
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>, BenchError> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).map_err(tar_err)?;
    encoder.finish().map_err(tar_err)
}

fn sha256(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn put_blob(dir: &Path, bytes: &[u8]) -> Result<String, BenchError> {
    let digest = sha256(bytes);
    write(&dir.join("blobs/sha256").join(&digest["sha256:".len()..]), bytes)?;
    Ok(digest)
}

fn write(path: &PathBuf, bytes: &[u8]) -> Result<(), BenchError> {
    std::fs::write(path, bytes).map_err(|e| BenchError::new(format!("{}: {e}", path.display())))
}

/// A small deterministic generator: the same image bytes every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn median_ratio(a: &Outcome, b: &Outcome) -> Option<f64> {
    let (a, b) = (a.summary()?.median.as_secs_f64(), b.summary()?.median.as_secs_f64());
    (b > 0.0).then(|| a / b)
}

pub fn print(r: &ImageResults, problems: &mut Vec<String>) {
    println!();
    if let Some(why) = &r.skipped {
        println!("== images: skipped: {why}");
        return;
    }
    println!(
        "== images: first pull of a {} MiB image ({:.1} MiB compressed, 4 gzip layers), store or \
         destination empty each time; {} runs, wall time, ms",
        r.image_mib,
        r.compressed_bytes as f64 / f64::from(1 << 20),
        r.pull_runs
    );
    report::time_header("", false);
    if let Some((ours, peer)) = &r.registry {
        let ratio = median_ratio(ours, peer).map_or_else(|| "-".into(), |x| format!("{x:.2}x"));
        report::time_row("airlock image pull (local registry)", ours, ratio, String::new(), problems);
        report::time_row(
            "skopeo copy + umoci unpack (local registry)",
            peer,
            String::new(),
            String::new(),
            problems,
        );
    } else {
        println!("  {:<LABEL_W$} skipped (see notes)", "from the local registry");
    }
    let (ours, peer) = &r.layout;
    let ratio = median_ratio(ours, peer).map_or_else(|| "-".into(), |x| format!("{x:.2}x"));
    report::time_row("airlock image pull oci:LAYOUT:TAG", ours, ratio, String::new(), problems);
    report::time_row("umoci unpack of the same layout", peer, String::new(), String::new(), problems);
    println!();
    println!(
        "== images: sandbox start on the cached image (pulled from the {}) and on the host root",
        r.start_source
    );
    report::time_header("", false);
    let (host, image) = &r.start;
    report::time_row(
        "airlock run --rm --mode none -- true (host root)",
        host,
        String::new(),
        String::new(),
        problems,
    );
    report::time_row("… --image IMAGE (cached) -- true", image, String::new(), String::new(), problems);
    if let (Some(h), Some(i)) = (host.summary(), image.summary()) {
        let added = i.median.as_secs_f64() - h.median.as_secs_f64();
        println!("  {:<LABEL_W$} {:+.2} ms (median difference)", "the image adds", added * 1e3);
    }
}

pub fn targets(r: &ImageResults, target: &mut dyn FnMut(Option<bool>, String)) {
    if let Some(why) = &r.skipped {
        target(None, format!("images: not measured ({why})"));
        return;
    }
    let registry = r.registry.as_ref().and_then(|(a, b)| median_ratio(a, b));
    match (registry, median_ratio(&r.layout.0, &r.layout.1)) {
        (Some(x), _) => target(
            Some(x <= MAX_PULL_RATIO),
            format!(
                "images: first pull from the local registry / skopeo copy + umoci unpack = {x:.2} (≤ {MAX_PULL_RATIO})"
            ),
        ),
        (None, Some(x)) => target(
            Some(x <= MAX_PULL_RATIO),
            format!(
                "images: no registry pull measured; first pull from an OCI layout / umoci unpack of it = {x:.2} \
                 (≤ {MAX_PULL_RATIO})"
            ),
        ),
        (None, None) => target(None, "images: first pull ratio not measured".into()),
    }
    match (r.start.0.summary(), r.start.1.summary()) {
        (Some(h), Some(i)) => {
            let added = Duration::from_secs_f64((i.median.as_secs_f64() - h.median.as_secs_f64()).max(0.0));
            target(
                Some(added <= MAX_ADDED_START),
                format!(
                    "images: start on a cached image adds {} to the host-root start (≤ {})",
                    report::ms(added),
                    report::ms(MAX_ADDED_START)
                ),
            );
        }
        _ => target(None, "images: cached-image start not measured".into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_built_layout_names_its_blobs_by_their_digests() {
        let dir = tempfile_dir();
        let compressed = build_layout(&dir, b"not really busybox", 1).unwrap();
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"], TAG);
        let blob = |digest: &serde_json::Value| {
            let digest = digest.as_str().unwrap();
            let bytes = std::fs::read(dir.join("blobs/sha256").join(&digest["sha256:".len()..])).unwrap();
            assert_eq!(sha256(&bytes), digest);
            bytes
        };
        let manifest: serde_json::Value =
            serde_json::from_slice(&blob(&index["manifests"][0]["digest"])).unwrap();
        blob(&manifest["config"]["digest"]);
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 4);
        let sizes: u64 = layers.iter().map(|l| blob(&l["digest"]).len() as u64).sum();
        assert_eq!(sizes, compressed);
        // Half of each file is random: gzip cannot take the image much below half.
        assert!(compressed > (1 << 20) * 2 / 5, "{compressed}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_pull_allows_the_registry_by_its_address_and_port() {
        assert_eq!(registry_address("127.0.0.1:5000/bench/image:bench"), "127.0.0.1:5000");
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("airlock-bench-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
