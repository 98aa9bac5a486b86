//! The guest: the distribution's kernel and an initramfs whose PID 1 is
//! airlock's own agent, built once and cached.
//!
//! The initramfs holds only what is needed before the host's root is
//! mounted: airlock's executable (its loaded part, see `elf`), the dynamic
//! loader and the libraries it was linked against (read from this
//! process's own mappings, so they are exactly the ones in use), and the
//! kernel modules for virtio-mmio, the virtio console, 9p, virtiofs and
//! overlay (with what
//! they depend on, from `modules.dep`), and apart from them those of
//! nftables, NAT and conntrack that a guest with transparent egress loads
//! too. Everything else — the programs a
//! sandbox runs — comes from the host's root, read-only over 9p.
//!
//! The cache is rebuilt when its key changes: airlock's executable (path,
//! size, modification time) or the kernel (release, size, modification
//! time), and the layout version below.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::VmError;
use crate::cpio::{self, Archive};
use crate::elf::Loadable;

/// Bumped whenever what goes into the initramfs changes.
const LAYOUT: u32 = 5;

/// The modules the guest loads, by name; their dependencies come along.
const WANTED_MODULES: [&str; 6] =
    ["virtio_mmio", "virtio_console", "9pnet_virtio", "9p", "overlay", "virtiofs"];

/// The modules a guest with transparent egress loads besides, for the
/// process tier's redirection (`airlock_jail::redirect`): nftables with
/// its `nat` chain type and NAT expression (DNAT to the listeners, and so
/// conntrack, which also answers `SO_ORIGINAL_DST`) and its `reject`
/// expression for the `inet` family (TCP resets, ICMP errors). Meta,
/// payload, compare and immediate are part of nf_tables itself.
/// `crc32c_generic` first: libcrc32c (conntrack's and nf_tables'
/// dependency) needs a crc32c implementation at load, a soft dependency
/// that modules.dep does not list, and the guest has no modprobe to find
/// one; the generic one, as the SSE 4.2 one needs a CPU that emulation
/// may not offer.
pub const TRANSPARENT_MODULES: [&str; 5] =
    ["crc32c_generic", "nf_tables", "nft_chain_nat", "nft_nat", "nft_reject_inet"];

/// The modules a guest with a container engine loads besides
/// (`crate::containers`): the virtio block device its engine's disk is,
/// and ext4, which the guest formats it with; the bridge and veth pairs
/// of the engine's default network (its containers' traffic is redirected
/// from the bridge as the guest's own is). `crc32c_generic` first, as for
/// transparent egress: ext4's metadata checksums need a crc32c.
pub const CONTAINER_MODULES: [&str; 5] = ["crc32c_generic", "virtio_blk", "ext4", "bridge", "veth"];

/// Where the initramfs keeps the modules and their load order.
pub const MODULE_DIR: &str = "/modules";
pub const MODULE_ORDER: &str = "/modules/order";
/// The load order of [`TRANSPARENT_MODULES`] and what they need that the
/// others did not bring.
pub const TRANSPARENT_ORDER: &str = "/modules/transparent";
/// The load order of [`CONTAINER_MODULES`] and what they need that the
/// base modules did not bring.
pub const CONTAINERS_ORDER: &str = "/modules/containers";

/// A kernel the guest can boot, with its modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

/// The newest kernel in /boot whose modules include 9p.
pub fn find_kernel() -> Option<Kernel> {
    let mut found: Vec<Kernel> = fs::read_dir("/boot")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let release = name.strip_prefix("vmlinuz-")?.to_owned();
            let modules = Path::new("/lib/modules").join(&release);
            modules.join("modules.dep").exists().then(|| Kernel { release, vmlinuz: e.path(), modules })
        })
        .collect();
    found.sort_by(|a, b| a.release.cmp(&b.release));
    found.pop()
}

/// A built guest, as its manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guest {
    pub key: String,
    pub kernel_release: String,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub initramfs_bytes: u64,
}

/// What `setup` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setup {
    UpToDate(Guest),
    Built(Guest),
}

impl Setup {
    pub fn guest(&self) -> &Guest {
        match self {
            Setup::UpToDate(g) | Setup::Built(g) => g,
        }
    }
}

fn guest_dir(cache: &Path) -> PathBuf {
    cache.join("guest")
}

fn key(kernel: &Kernel, exe: &Path) -> Result<String, VmError> {
    use std::os::unix::fs::MetadataExt;
    let stamp = |path: &Path| -> Result<String, VmError> {
        let m = fs::metadata(path).map_err(|e| VmError::io(path, e))?;
        Ok(format!("{}:{}:{}.{}", path.display(), m.size(), m.mtime(), m.mtime_nsec()))
    };
    Ok(format!(
        "layout {LAYOUT}; airlock {} {}; kernel {} {}",
        env!("CARGO_PKG_VERSION"),
        stamp(exe)?,
        kernel.release,
        stamp(&kernel.vmlinuz)?
    ))
}

/// The cached guest if it is current, without building anything.
pub fn current(cache: &Path) -> Result<Option<Guest>, VmError> {
    let Some(kernel) = find_kernel() else { return Err(VmError::NoKernel) };
    let exe = std::env::current_exe().map_err(|e| VmError::io(Path::new("/proc/self/exe"), e))?;
    let key = key(&kernel, &exe)?;
    let manifest = guest_dir(cache).join("guest.json");
    let Ok(text) = fs::read_to_string(&manifest) else { return Ok(None) };
    let Ok(guest) = serde_json::from_str::<Guest>(&text) else { return Ok(None) };
    Ok((guest.key == key && guest.kernel.exists() && guest.initramfs.exists()).then_some(guest))
}

/// Builds the guest unless the cached one is current; `progress` hears each step.
pub fn setup(cache: &Path, progress: &mut dyn FnMut(&str)) -> Result<Setup, VmError> {
    crate::boot::sweep_runs(&cache.join("run"));
    if let Some(guest) = current(cache)? {
        return Ok(Setup::UpToDate(guest));
    }
    // One builder at a time; whoever waited finds the guest built.
    fs::create_dir_all(cache).map_err(|e| VmError::io(cache, e))?;
    let lock_path = cache.join("setup.lock");
    let lock = fs::File::create(&lock_path).map_err(|e| VmError::io(&lock_path, e))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| VmError::io(&lock_path, e.into()))?;
    if let Some(guest) = current(cache)? {
        return Ok(Setup::UpToDate(guest));
    }
    let started = Instant::now();
    let kernel = find_kernel().ok_or(VmError::NoKernel)?;
    let exe = std::env::current_exe().map_err(|e| VmError::io(Path::new("/proc/self/exe"), e))?;
    let key = key(&kernel, &exe)?;
    progress(&format!("kernel {} ({})", kernel.release, kernel.vmlinuz.display()));
    fs::create_dir_all(cache).map_err(|e| VmError::io(cache, e))?;
    // Built beside the old one and renamed into place: a guest is complete or absent.
    let building = cache.join(format!("guest.building.{}", std::process::id()));
    let _ = fs::remove_dir_all(&building);
    fs::create_dir_all(&building).map_err(|e| VmError::io(&building, e))?;
    let result = build(&building, &kernel, &exe, &key, progress);
    let guest = match result {
        Ok(g) => g,
        Err(e) => {
            let _ = fs::remove_dir_all(&building);
            return Err(e);
        }
    };
    let dir = guest_dir(cache);
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&building, &dir).map_err(|e| VmError::io(&dir, e))?;
    let kernel_file = guest.kernel.file_name().map(|n| dir.join(n)).unwrap_or_else(|| dir.join("vmlinuz"));
    let guest = Guest { kernel: kernel_file, initramfs: dir.join("initramfs.cpio"), ..guest };
    let manifest = serde_json::to_string_pretty(&guest).map_err(|e| VmError::Manifest(e.to_string()))?;
    fs::write(dir.join("guest.json"), manifest).map_err(|e| VmError::io(&dir, e))?;
    progress(&format!(
        "guest ready in {} ({} MiB initramfs, built in {} ms)",
        dir.display(),
        guest.initramfs_bytes >> 20,
        started.elapsed().as_millis()
    ));
    Ok(Setup::Built(guest))
}

fn build(
    dir: &Path,
    kernel: &Kernel,
    exe: &Path,
    key: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<Guest, VmError> {
    let vmlinuz = kernel_image(&kernel.vmlinuz, dir, progress)?;
    let image = dir.join("initramfs.cpio");
    let file = fs::File::create(&image).map_err(|e| VmError::io(&image, e))?;
    let mut archive = Archive::new(BufWriter::new(file));
    let mut dirs = Directories::default();
    let io = |e| VmError::io(&image, e);
    for d in ["/proc", "/sys", "/dev", "/newroot", MODULE_DIR] {
        dirs.ensure(&mut archive, d).map_err(io)?;
    }

    // Streamed from the file: a debug build is hundreds of MB, which this
    // process (a sandbox's supervisor, on its first run) would otherwise hold.
    let binary = fs::File::open(exe).map_err(|e| VmError::io(exe, e))?;
    let binary_bytes = binary.metadata().map_err(|e| VmError::io(exe, e))?.len();
    let init = Loadable::of(&binary).map_err(|e| VmError::io(exe, e))?;
    let reader = init.reader(binary).map_err(|e| VmError::io(exe, e))?;
    archive.file_from("/init", cpio::EXECUTABLE, init.len, reader).map_err(io)?;
    progress(&format!(
        "airlock {} ({} MiB loaded part of {} MiB)",
        exe.display(),
        init.len >> 20,
        binary_bytes >> 20
    ));
    let interp = init.interpreter;

    // The loader at the path the executable names, and each library at the
    // path it is mapped from (the loader's default directories).
    let mut libraries = mapped_libraries()?;
    if let Some(interp) = &interp {
        libraries.insert(PathBuf::from(interp));
    }
    for lib in &libraries {
        let data = fs::read(lib).map_err(|e| VmError::io(lib, e))?;
        let path = lib.to_string_lossy();
        if let Some(parent) = lib.parent() {
            dirs.ensure(&mut archive, &parent.to_string_lossy()).map_err(io)?;
        }
        archive.file(&path, cpio::EXECUTABLE, &data).map_err(io)?;
    }
    progress(&format!("{} libraries and the loader", libraries.len()));

    let modules = module_order(&kernel.modules)?;
    let transparent = extra_module_order(&kernel.modules, &TRANSPARENT_MODULES, &modules)?;
    let containers = extra_module_order(&kernel.modules, &CONTAINER_MODULES, &modules)?;
    for (list, prefix, order_file) in [
        (&modules, "", MODULE_ORDER),
        (&transparent, "t", TRANSPARENT_ORDER),
        (&containers, "c", CONTAINERS_ORDER),
    ] {
        let mut order = String::new();
        for (i, module) in list.iter().enumerate() {
            let data = fs::read(module).map_err(|e| VmError::io(module, e))?;
            let name = format!("{prefix}{i:02}-{}", module.file_name().unwrap_or_default().to_string_lossy());
            archive.file(&format!("{MODULE_DIR}/{name}"), cpio::REGULAR, &data).map_err(io)?;
            order.push_str(&name);
            order.push('\n');
        }
        archive.file(order_file, cpio::REGULAR, order.as_bytes()).map_err(io)?;
    }
    progress(&format!(
        "{} kernel modules (virtio-mmio, virtio console, 9p, virtiofs, overlay and their dependencies), \
         {} for transparent egress (nftables, NAT, conntrack) and {} for a container engine's disk \
         (virtio-blk, ext4)",
        modules.len(),
        transparent.len(),
        containers.len()
    ));
    let (mut out, bytes) = archive.finish().map_err(io)?;
    out.flush().map_err(io)?;
    Ok(Guest {
        key: key.to_owned(),
        kernel_release: kernel.release.clone(),
        kernel: vmlinuz,
        initramfs: image,
        initramfs_bytes: bytes,
    })
}

/// The kernel QEMU boots. A bzImage decompresses itself, which under
/// software emulation takes most of the boot (29 s against 6 s to a panic
/// on the development machine); so when its payload is xz (Debian's) and
/// the kernel inside has a PVH entry point, the uncompressed kernel is
/// written instead and QEMU starts it directly. Otherwise the bzImage.
fn kernel_image(bzimage: &Path, dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, VmError> {
    let data = fs::read(bzimage).map_err(|e| VmError::io(bzimage, e))?;
    let vmlinux = dir.join("vmlinux");
    let why = match uncompress(&data, &vmlinux) {
        Ok(bytes) => {
            progress(&format!("kernel decompressed ({} MiB, started at its PVH entry)", bytes >> 20));
            return Ok(vmlinux);
        }
        Err(why) => why,
    };
    let _ = fs::remove_file(&vmlinux);
    let path = dir.join("vmlinuz");
    fs::write(&path, &data).map_err(|e| VmError::io(&path, e))?;
    progress(&format!("kernel kept compressed ({why}): it decompresses itself at every boot"));
    Ok(path)
}

/// The kernel inside a bzImage, written to `to` as it decompresses (never
/// held whole: it is some 60 MB), when its payload (located by the boot
/// protocol's setup header) is xz-compressed and it is bootable by PVH.
/// Its size, or why not.
fn uncompress(bzimage: &[u8], to: &Path) -> Result<u64, String> {
    let payload = xz_payload(bzimage)?;
    let written = fs::File::create(to).and_then(|file| {
        let mut out = BufWriter::new(file);
        let bytes = std::io::copy(&mut liblzma::read::XzDecoder::new(payload), &mut out)?;
        out.flush()?;
        Ok(bytes)
    });
    let bytes = written.map_err(|e| format!("xz: {e}"))?;
    let vmlinux = fs::File::open(to).map_err(|e| e.to_string())?;
    match crate::elf::has_pvh_entry(&vmlinux) {
        Ok(true) => Ok(bytes),
        Ok(false) => Err("the kernel has no PVH entry point".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A bzImage's payload, when it is xz.
fn xz_payload(bzimage: &[u8]) -> Result<&[u8], String> {
    let byte = |at: usize| bzimage.get(at).copied().ok_or("not a bzImage");
    let word = |at: usize| -> Result<usize, String> {
        let b = bzimage.get(at..at + 4).ok_or("not a bzImage")?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if bzimage.get(0x202..0x206) != Some(b"HdrS".as_slice()) {
        return Err("not a bzImage".into());
    }
    let setup_sectors = match byte(0x1f1)? {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sectors + 1) * 512 + word(0x248)?;
    let payload = bzimage.get(start..start + word(0x24c)?).ok_or("payload outside the file")?;
    if !payload.starts_with(b"\xfd7zXZ\0") {
        return Err("its payload is not xz".into());
    }
    Ok(payload)
}

/// Directories already in the archive, so each is written once, parents first.
#[derive(Default)]
struct Directories(BTreeSet<String>);

impl Directories {
    fn ensure<W: Write>(&mut self, archive: &mut Archive<W>, path: &str) -> std::io::Result<()> {
        let mut sofar = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            sofar.push('/');
            sofar.push_str(part);
            if self.0.insert(sofar.clone()) {
                archive.directory(&sofar)?;
            }
        }
        Ok(())
    }
}

/// The shared objects this process has mapped: airlock's libraries.
fn mapped_libraries() -> Result<BTreeSet<PathBuf>, VmError> {
    let maps =
        fs::read_to_string("/proc/self/maps").map_err(|e| VmError::io(Path::new("/proc/self/maps"), e))?;
    Ok(maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.starts_with('/') && p.contains(".so"))
        .map(PathBuf::from)
        .collect())
}

/// The wanted modules and their dependencies, each after what it needs.
fn module_order(modules: &Path) -> Result<Vec<PathBuf>, VmError> {
    let order = dependency_order(modules, &WANTED_MODULES)?;
    let missing: Vec<&str> = ["9p", "9pnet_virtio", "virtio_console"]
        .into_iter()
        .filter(|w| !order.iter().any(|m| module_name(m).as_deref() == Some(*w)))
        .filter(|w| !builtin(modules, w))
        .collect();
    if !missing.is_empty() {
        return Err(VmError::Modules(format!("{} has no {}", modules.display(), missing.join(", "))));
    }
    Ok(order.into_iter().map(|m| modules.join(m)).collect())
}

/// Modules a guest loads only when it needs them ([`TRANSPARENT_MODULES`],
/// [`CONTAINER_MODULES`]) and their dependencies, each after what it
/// needs, without those `loaded` (the guest's own) already has. A kernel
/// that lacks some (built in, or not built) gets what it has: a guest that
/// then cannot install the redirection or mount its engine's disk says
/// so, and its sandbox does not start.
fn extra_module_order(modules: &Path, wanted: &[&str], loaded: &[PathBuf]) -> Result<Vec<PathBuf>, VmError> {
    Ok(dependency_order(modules, wanted)?
        .into_iter()
        .map(|m| modules.join(m))
        .filter(|m| !loaded.contains(m))
        .collect())
}

/// A module's name as the kernel knows it (`nf_tables` for
/// `kernel/net/netfilter/nf_tables.ko`; dashes are underscores).
fn module_name(path: &str) -> Option<String> {
    Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().split('.').next().unwrap_or_default().replace('-', "_"))
}

/// `wanted`, in that order, each after the modules it needs (transitively,
/// from `modules.dep`), every module once; as paths relative to `modules`.
fn dependency_order(modules: &Path, wanted: &[&str]) -> Result<Vec<String>, VmError> {
    let dep_file = modules.join("modules.dep");
    let text = fs::read_to_string(&dep_file).map_err(|e| VmError::io(&dep_file, e))?;
    let deps: Vec<(String, Vec<String>)> = text
        .lines()
        .filter_map(|l| {
            let (module, needs) = l.split_once(':')?;
            Some((module.trim().to_owned(), needs.split_whitespace().map(str::to_owned).collect()))
        })
        .collect();
    let mut order: Vec<String> = Vec::new();
    fn visit(module: &str, deps: &[(String, Vec<String>)], order: &mut Vec<String>, depth: usize) {
        if order.iter().any(|m| m == module) || depth > 64 {
            return;
        }
        if let Some((_, needs)) = deps.iter().find(|(m, _)| m == module) {
            for need in needs {
                visit(need, deps, order, depth + 1);
            }
        }
        order.push(module.to_owned());
    }
    for wanted in wanted {
        let Some((path, _)) = deps.iter().find(|(m, _)| module_name(m).as_deref() == Some(*wanted)) else {
            // Built into this kernel (or absent): nothing to load.
            continue;
        };
        let path = path.clone();
        visit(&path, &deps, &mut order, 0);
    }
    Ok(order)
}

fn builtin(modules: &Path, name: &str) -> bool {
    fs::read_to_string(modules.join("modules.builtin"))
        .is_ok_and(|t| t.lines().any(|l| l.rsplit('/').next().is_some_and(|f| f == format!("{name}.ko"))))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn modules_come_after_what_they_need() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("modules.dep"),
            "kernel/fs/9p/9p.ko: kernel/fs/netfs/netfs.ko kernel/net/9p/9pnet.ko\n\
             kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/net/9p/9pnet.ko:\nkernel/fs/netfs/netfs.ko:\nkernel/drivers/virtio/virtio_ring.ko:\n\
             kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/fs/fuse/fuse.ko:\nkernel/fs/fuse/virtiofs.ko: kernel/drivers/virtio/virtio_ring.ko \
             kernel/fs/fuse/fuse.ko\n",
        )
        .unwrap();
        let order: Vec<String> = module_order(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let at = |m: &str| order.iter().position(|o| o == m).unwrap();
        assert!(at("virtio_ring.ko") < at("virtio_console.ko"));
        assert!(at("9pnet.ko") < at("9pnet_virtio.ko"));
        assert!(at("netfs.ko") < at("9p.ko"));
        assert_eq!(order.iter().filter(|m| *m == "9pnet.ko").count(), 1);
        // virtio-fs, for an overlay workspace's layer or a rw workspace, after FUSE.
        assert!(at("fuse.ko") < at("virtiofs.ko"));
    }

    /// modules.dep of Debian's 6.1 kernel for the netfilter modules (the
    /// lines the transparent set reaches, in the file's own order).
    const NETFILTER_DEP: &str = "\
kernel/crypto/crc32c_generic.ko:
kernel/lib/libcrc32c.ko:
kernel/net/netfilter/nfnetlink.ko:
kernel/net/netfilter/nf_conntrack.ko: kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko kernel/lib/libcrc32c.ko
kernel/net/netfilter/nf_nat.ko: kernel/net/netfilter/nf_conntrack.ko kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko kernel/lib/libcrc32c.ko
kernel/net/netfilter/nf_tables.ko: kernel/net/netfilter/nfnetlink.ko kernel/lib/libcrc32c.ko
kernel/net/netfilter/nft_nat.ko: kernel/net/netfilter/nf_tables.ko kernel/net/netfilter/nfnetlink.ko kernel/net/netfilter/nf_nat.ko kernel/net/netfilter/nf_conntrack.ko kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko kernel/lib/libcrc32c.ko
kernel/net/netfilter/nft_reject.ko: kernel/net/netfilter/nf_tables.ko kernel/net/netfilter/nfnetlink.ko kernel/lib/libcrc32c.ko
kernel/net/netfilter/nft_reject_inet.ko: kernel/net/ipv4/netfilter/nf_reject_ipv4.ko kernel/net/ipv6/netfilter/nf_reject_ipv6.ko kernel/net/netfilter/nft_reject.ko kernel/net/netfilter/nf_tables.ko kernel/net/netfilter/nfnetlink.ko kernel/lib/libcrc32c.ko
kernel/net/netfilter/nft_chain_nat.ko: kernel/net/netfilter/nf_tables.ko kernel/net/netfilter/nfnetlink.ko kernel/net/netfilter/nf_nat.ko kernel/net/netfilter/nf_conntrack.ko kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko kernel/lib/libcrc32c.ko
kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko:
kernel/net/ipv4/netfilter/nf_reject_ipv4.ko:
kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko:
kernel/net/ipv6/netfilter/nf_reject_ipv6.ko:
kernel/drivers/char/virtio_console.ko:
kernel/net/9p/9pnet.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko
";

    /// The transparent set: every module the redirection needs, once,
    /// each after what it needs, the crc32c implementation before the
    /// library that looks for it, and none of the guest's own again.
    #[test]
    fn transparent_egress_modules_come_in_dependency_order() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("modules.dep"), NETFILTER_DEP).unwrap();
        let base = module_order(dir.path()).unwrap();
        let order: Vec<String> = extra_module_order(dir.path(), &TRANSPARENT_MODULES, &base)
            .unwrap()
            .iter()
            .map(|p| module_name(&p.to_string_lossy()).unwrap())
            .collect();
        let at = |m: &str| order.iter().position(|o| o == m).unwrap_or_else(|| panic!("no {m} in {order:?}"));
        let expected = [
            "crc32c_generic",
            "libcrc32c",
            "nfnetlink",
            "nf_tables",
            "nf_defrag_ipv4",
            "nf_defrag_ipv6",
            "nf_conntrack",
            "nf_nat",
            "nft_chain_nat",
            "nft_nat",
            "nf_reject_ipv4",
            "nf_reject_ipv6",
            "nft_reject",
            "nft_reject_inet",
        ];
        assert_eq!(order.len(), expected.len(), "{order:?}");
        for m in expected {
            at(m);
        }
        for (before, after) in [
            ("crc32c_generic", "libcrc32c"),
            ("libcrc32c", "nf_tables"),
            ("nfnetlink", "nf_tables"),
            ("nf_defrag_ipv4", "nf_conntrack"),
            ("nf_defrag_ipv6", "nf_conntrack"),
            ("nf_conntrack", "nf_nat"),
            ("nf_nat", "nft_chain_nat"),
            ("nf_tables", "nft_chain_nat"),
            ("nf_nat", "nft_nat"),
            ("nft_reject", "nft_reject_inet"),
            ("nf_reject_ipv4", "nft_reject_inet"),
            ("nf_reject_ipv6", "nft_reject_inet"),
        ] {
            assert!(at(before) < at(after), "{before} after {after}: {order:?}");
        }
        let base: Vec<String> = base.iter().map(|p| module_name(&p.to_string_lossy()).unwrap()).collect();
        assert!(order.iter().all(|m| !base.contains(m)), "{order:?} repeats {base:?}");
        // A kernel without netfilter modules: nothing to load.
        let bare = tempfile::tempdir().unwrap();
        fs::write(bare.path().join("modules.dep"), "kernel/drivers/char/virtio_console.ko:\n").unwrap();
        assert!(extra_module_order(bare.path(), &TRANSPARENT_MODULES, &[]).unwrap().is_empty());
    }

    /// The kernel `vm setup` would pick has every module of the set (or
    /// has it built in): the guest it builds can redirect.
    #[test]
    fn the_installed_kernel_has_what_transparent_egress_needs() {
        let Some(kernel) = find_kernel() else {
            assert!(
                std::env::var_os("CI").is_none_or(|v| v != "true"),
                "no kernel in /boot with its modules, which CI's host has"
            );
            eprintln!("skipped: no kernel in /boot with its modules in /lib/modules");
            return;
        };
        let order = extra_module_order(&kernel.modules, &TRANSPARENT_MODULES, &[]).unwrap();
        let names: Vec<String> = order.iter().map(|p| module_name(&p.to_string_lossy()).unwrap()).collect();
        for wanted in TRANSPARENT_MODULES {
            assert!(
                names.iter().any(|n| n == wanted) || builtin(&kernel.modules, wanted),
                "{} has no {wanted}: {names:?}",
                kernel.modules.display()
            );
        }
        assert!(order.iter().all(|p| p.exists()), "{order:?}");
        let order = extra_module_order(&kernel.modules, &CONTAINER_MODULES, &[]).unwrap();
        let names: Vec<String> = order.iter().map(|p| module_name(&p.to_string_lossy()).unwrap()).collect();
        for wanted in CONTAINER_MODULES {
            assert!(
                names.iter().any(|n| n == wanted) || builtin(&kernel.modules, wanted),
                "{} has no {wanted}: {names:?}",
                kernel.modules.display()
            );
        }
    }

    #[test]
    fn only_an_xz_bzimage_is_decompressed() {
        assert_eq!(xz_payload(b"MZ not a kernel").unwrap_err(), "not a bzImage");
        // A setup header whose payload is not xz.
        let mut image = vec![0u8; 8192];
        image[0x1f1] = 1;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&64u32.to_le_bytes());
        image[1024 + 16..1024 + 20].copy_from_slice(b"\x1f\x8b\x08\x00");
        assert_eq!(xz_payload(&image).unwrap_err(), "its payload is not xz");
    }

    #[test]
    fn a_kernel_without_9p_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("modules.dep"), "kernel/drivers/char/virtio_console.ko:\n").unwrap();
        let err = module_order(dir.path()).unwrap_err().to_string();
        assert!(err.contains("9p"), "{err}");
    }
}
