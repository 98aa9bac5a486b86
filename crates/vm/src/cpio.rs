//! A writer of the "newc" cpio format, the one the kernel unpacks as an
//! initramfs. Twenty lines of format do not need a dependency, and the
//! guest is then built without an external `cpio` program.

use std::io::{self, Read, Write};

/// Entry modes (`st_mode`), type bits included.
pub const DIRECTORY: u32 = 0o040_755;
pub const EXECUTABLE: u32 = 0o100_755;
pub const REGULAR: u32 = 0o100_644;
pub const SYMLINK: u32 = 0o120_777;

/// Writes entries one after another; [`Archive::finish`] adds the trailer.
pub struct Archive<W: Write> {
    out: W,
    written: u64,
    next_inode: u32,
}

impl<W: Write> Archive<W> {
    pub fn new(out: W) -> Archive<W> {
        Archive { out, written: 0, next_inode: 1 }
    }

    /// A directory; its parents must come first.
    pub fn directory(&mut self, path: &str) -> io::Result<()> {
        self.entry(path, DIRECTORY, b"")
    }

    /// A file with these contents and mode (type bits included).
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, mode, data)
    }

    /// A file of `len` bytes read from `data`, which must have that many:
    /// what the archive holds of it at once is a copy buffer, whatever its size.
    pub fn file_from(&mut self, path: &str, mode: u32, len: u64, data: impl Read) -> io::Result<()> {
        self.header(path, mode, len)?;
        let copied = io::copy(&mut data.take(len), &mut self.out)?;
        self.written += copied;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{path}: {copied} of {len} bytes"),
            ));
        }
        self.pad()
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, SYMLINK, target.as_bytes())
    }

    /// The trailer; returns the writer and the archive's size.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.entry("TRAILER!!!", 0, b"")?;
        self.out.flush()?;
        Ok((self.out, self.written))
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.header(path, mode, data.len() as u64)?;
        self.put(data)?;
        self.pad()
    }

    /// An entry's header and name, padded: its `size` bytes of data follow.
    fn header(&mut self, path: &str, mode: u32, size: u64) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad archive path {path:?}")));
        }
        let size = u32::try_from(size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{path}: over 4 GiB")))?;
        let inode = if mode == 0 { 0 } else { self.next_inode };
        self.next_inode += 1;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let fields = [inode, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, name.len() as u32 + 1, 0];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(b"\0")?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Header and name, and the data, each end on a multiple of four.
    fn pad(&mut self) -> io::Result<()> {
        let padding = (4 - self.written % 4) % 4;
        self.put(&[0u8; 3][..padding as usize])
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn entries_are_newc_aligned_and_end_with_the_trailer() {
        let mut archive = Archive::new(Vec::new());
        archive.directory("/bin").unwrap();
        archive.file("/bin/hello", EXECUTABLE, b"hi\n").unwrap();
        archive.symlink("/init", "bin/hello").unwrap();
        let (bytes, size) = archive.finish().unwrap();
        assert_eq!(bytes.len() as u64, size);
        assert_eq!(size % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        // The second header starts on the four-byte boundary after "bin\0"
        // (110 + 4 bytes, padded to 116).
        let second = 116;
        assert_eq!(&bytes[second..second + 6], b"070701");
        // Its mode and size fields.
        assert_eq!(&bytes[second + 14..second + 22], b"000081ed");
        assert_eq!(&bytes[second + 54..second + 62], b"00000003");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("bin/hello\0"));
        assert!(text.contains("TRAILER!!!\0"));
    }

    #[test]
    fn a_streamed_file_is_the_same_entry_and_must_have_its_length() {
        let mut whole = Archive::new(Vec::new());
        whole.file("/f", REGULAR, b"hello").unwrap();
        let mut streamed = Archive::new(Vec::new());
        streamed.file_from("/f", REGULAR, 5, &b"hello, and more"[..]).unwrap();
        assert_eq!(streamed.finish().unwrap(), whole.finish().unwrap());
        let mut short = Archive::new(Vec::new());
        let err = short.file_from("/f", REGULAR, 5, &b"hel"[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }

    #[test]
    fn unpacks_with_the_system_cpio_when_there_is_one() {
        let Ok(status) = std::process::Command::new("cpio").arg("--version").output() else { return };
        if !status.status.success() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut archive = Archive::new(Vec::new());
        archive.directory("d").unwrap();
        archive.file("d/f", REGULAR, b"content").unwrap();
        archive.symlink("l", "d/f").unwrap();
        let (bytes, _) = archive.finish().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-id", "--quiet"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(std::fs::read(dir.path().join("d/f")).unwrap(), b"content");
        assert_eq!(std::fs::read_link(dir.path().join("l")).unwrap(), std::path::Path::new("d/f"));
    }
}
