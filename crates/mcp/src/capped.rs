//! Output kept up to a cap: an exec's streams, a file read, a diff. What
//! goes past the cap is counted, not kept, so the caller learns how much
//! it did not see.

/// How much of a text's end is kept apart from the cap: enough for a
/// diff's digest line (`change sha256:…`, 78 bytes).
const TAIL_LEN: usize = 256;

#[derive(Debug)]
pub struct Capped {
    cap: usize,
    kept: Vec<u8>,
    total: u64,
    tail: Vec<u8>,
}

impl Capped {
    pub fn new(cap: usize) -> Capped {
        Capped { cap, kept: Vec::new(), total: 0, tail: Vec::new() }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        let room = self.cap.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&data[..data.len().min(room)]);
        self.tail.extend_from_slice(data);
        if self.tail.len() > TAIL_LEN {
            self.tail.drain(..self.tail.len() - TAIL_LEN);
        }
    }

    /// Every byte seen, kept or not.
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn truncated(&self) -> bool {
        self.total > self.kept.len() as u64
    }

    pub fn bytes(&self) -> &[u8] {
        &self.kept
    }

    /// The kept bytes as text (invalid UTF-8 replaced), ending with a
    /// marker that says how much was left out, when anything was.
    pub fn text(&self) -> String {
        let mut text = String::from_utf8_lossy(&self.kept).into_owned();
        if self.truncated() {
            text.push_str(&format!(
                "\n[airlock: output truncated: {} of {} bytes shown]",
                self.kept.len(),
                self.total
            ));
        }
        text
    }

    /// The last complete line seen, without its newline.
    pub fn last_line(&self) -> Option<&str> {
        let text = std::str::from_utf8(&self.tail).ok()?;
        text.strip_suffix('\n')?.rsplit('\n').next()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn bytes_past_the_cap_are_counted_and_marked() {
        let mut c = Capped::new(5);
        c.push(b"abc");
        c.push(b"defgh");
        assert_eq!(c.bytes(), b"abcde");
        assert_eq!(c.total(), 8);
        assert!(c.truncated());
        assert_eq!(c.text(), "abcde\n[airlock: output truncated: 5 of 8 bytes shown]");
    }

    #[test]
    fn text_within_the_cap_is_whole_and_unmarked() {
        let mut c = Capped::new(64);
        c.push(b"hello\n");
        assert!(!c.truncated());
        assert_eq!(c.text(), "hello\n");
    }

    #[test]
    fn the_last_line_survives_a_cut_text() {
        let mut c = Capped::new(4);
        c.push(&b"+line\n".repeat(100));
        c.push(b"change sha256:ab\n");
        assert_eq!(c.last_line(), Some("change sha256:ab"));
        let mut open = Capped::new(4);
        open.push(b"no newline at the end");
        assert_eq!(open.last_line(), None);
    }
}
