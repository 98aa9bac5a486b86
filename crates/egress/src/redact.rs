//! Keeping secret values out of captured output (logs, test output,
//! artifacts).
//!
//! Every byte covered by an occurrence of any secret value is replaced.
//! Occurrences that overlap (the same secret, or two secrets sharing a
//! stretch of bytes) are redacted as one run, labelled once for each secret
//! whose occurrence makes the run longer: `[REDACTED:A][REDACTED:B]`. An
//! occurrence lying wholly inside another adds nothing. Covering the union
//! of all occurrences, rather than picking non-overlapping matches, matters:
//! with A = "…xy" and B = "xy…" the text "…xy…" must not show the rest of B
//! after A's label.
//!
//! The streaming [`Redactor`] gives exactly the output [`redact_all`] gives
//! for the same bytes, however they are split into chunks. It holds back
//! only bytes that could still be the start of a secret (at most the
//! longest value's length less one), so ordinary output passes through
//! without delay.
//!
//! The label is `[REDACTED:NAME]` for captured output; the egress proxy
//! puts each secret's placeholder there instead, in the responses it
//! relays ([`Redactor::replacing`]).

/// A streaming redactor for one output stream.
pub struct Redactor {
    /// Secret names, indexed by `Pattern::name`.
    names: Vec<String>,
    /// What replaces each secret's run, indexed like `names`.
    labels: Vec<Vec<u8>>,
    /// Candidate patterns by first byte, longest first (so the first full
    /// match at a position is the longest there).
    by_first_byte: Vec<Vec<Pattern>>,
    /// Bytes received but not yet decided: a possible secret prefix.
    pending: Vec<u8>,
    /// The redaction run in progress, if any.
    run: Option<Run>,
}

struct Pattern {
    value: Vec<u8>,
    name: usize,
}

/// A run of redacted bytes whose label is emitted once the run can no
/// longer grow.
#[derive(Debug)]
struct Run {
    /// End of the run, relative to the start of `pending`.
    end: usize,
    /// Secrets whose occurrences make up the run, in order.
    names: Vec<usize>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: the values and held bytes are (possibly) secret.
        f.debug_struct("Redactor")
            .field("names", &self.names)
            .field("held_bytes", &self.pending.len())
            .finish_non_exhaustive()
    }
}

/// Whether a secret occurrence starts at a position.
enum MatchAt {
    /// The longest secret occurring there, as (length, name).
    Found(usize, usize),
    None,
    /// A secret might start here; the bytes so far are a prefix of it.
    Undecided,
}

impl Redactor {
    /// A redactor for `(name, value)` pairs, labelling each run
    /// `[REDACTED:NAME]`. Empty values are ignored (an empty secret is
    /// refused earlier, when secrets are read).
    pub fn new(secrets: &[(String, Vec<u8>)]) -> Redactor {
        Redactor::replacing(secrets, |name| format!("[REDACTED:{name}]").into_bytes())
    }

    /// A redactor that puts `label(NAME)` where a secret's value was.
    pub fn replacing(secrets: &[(String, Vec<u8>)], label: impl Fn(&str) -> Vec<u8>) -> Redactor {
        let mut names = Vec::new();
        let mut by_first_byte: Vec<Vec<Pattern>> = (0..=u8::MAX).map(|_| Vec::new()).collect();
        for (name, value) in secrets {
            let Some(&first) = value.first() else { continue };
            let index = names.iter().position(|n| n == name).unwrap_or_else(|| {
                names.push(name.clone());
                names.len() - 1
            });
            by_first_byte[usize::from(first)].push(Pattern { value: value.clone(), name: index });
        }
        for patterns in &mut by_first_byte {
            // Stable: of equal values, the first given names them.
            patterns.sort_by_key(|pattern| std::cmp::Reverse(pattern.value.len()));
        }
        let labels = names.iter().map(|name| label(name)).collect();
        Redactor { names, labels, by_first_byte, pending: Vec::new(), run: None }
    }

    /// True when there is nothing to redact: no non-empty secret value was
    /// given, and `feed` returns its input unchanged and holds nothing back.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Takes the next chunk of the stream; returns the output that is now
    /// decided. Bytes that might begin a secret are held until the next
    /// chunk or [`Redactor::finish`].
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.is_empty() {
            return chunk.to_vec();
        }
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(chunk.len());
        self.process(false, &mut out);
        out
    }

    /// Redacts one whole piece (a header value) as a stream of its own.
    pub fn redact(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = self.feed(data);
        out.extend(self.finish());
        out
    }

    /// Ends the stream: returns everything still held, redacted. The
    /// redactor can then be used for a new stream.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        self.process(true, &mut out);
        self.close_run(&mut out);
        self.pending.clear();
        out
    }

    /// Decides positions of `pending` from the start until one is undecided
    /// (or all are, at the end of the stream), writing the output.
    fn process(&mut self, at_end: bool, out: &mut Vec<u8>) {
        let mut pos = 0;
        loop {
            if self.run.as_ref().is_some_and(|run| pos >= run.end) {
                self.close_run(out);
            }
            let Some(&byte) = self.pending.get(pos) else { break };
            match self.match_at(pos, at_end) {
                MatchAt::Undecided => break,
                MatchAt::Found(len, name) => match &mut self.run {
                    // Overlaps the run in progress: extend it, if it reaches further.
                    Some(run) => {
                        if pos + len > run.end {
                            run.end = pos + len;
                            if !run.names.contains(&name) {
                                run.names.push(name);
                            }
                        }
                    }
                    None => self.run = Some(Run { end: pos + len, names: vec![name] }),
                },
                MatchAt::None => {}
            }
            if self.run.is_none() {
                out.push(byte);
            }
            pos += 1;
        }
        self.pending.drain(..pos);
        if let Some(run) = &mut self.run {
            run.end -= pos;
        }
    }

    fn match_at(&self, pos: usize, at_end: bool) -> MatchAt {
        let rest = &self.pending[pos..];
        let Some(&first) = rest.first() else { return MatchAt::None };
        for pattern in &self.by_first_byte[usize::from(first)] {
            if rest.len() >= pattern.value.len() {
                if rest.starts_with(&pattern.value) {
                    return MatchAt::Found(pattern.value.len(), pattern.name);
                }
            } else if !at_end && pattern.value.starts_with(rest) {
                // This longer pattern may still match once more bytes come;
                // a shorter match here would not be the longest.
                return MatchAt::Undecided;
            }
        }
        MatchAt::None
    }

    fn close_run(&mut self, out: &mut Vec<u8>) {
        if let Some(run) = self.run.take() {
            for name in run.names {
                out.extend_from_slice(&self.labels[name]);
            }
        }
    }
}

/// Redacts a whole buffer (a file collected as an artifact).
pub fn redact_all(data: &[u8], secrets: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut redactor = Redactor::new(secrets);
    let mut out = redactor.feed(data);
    out.extend(redactor.finish());
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn secrets(list: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        list.iter().map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec())).collect()
    }

    fn all(data: &str, list: &[(&str, &str)]) -> String {
        String::from_utf8(redact_all(data.as_bytes(), &secrets(list))).unwrap()
    }

    /// Feeds `data` in the given pieces and collects the whole output.
    fn streamed(data: &[u8], cuts: &[usize], list: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut r = Redactor::new(list);
        let mut out = Vec::new();
        let mut start = 0;
        for &cut in cuts {
            out.extend(r.feed(&data[start..cut]));
            start = cut;
        }
        out.extend(r.feed(&data[start..]));
        out.extend(r.finish());
        out
    }

    /// A slow reference over the whole buffer: at each position the
    /// longest occurrence (brute force) starts or extends a run.
    fn reference(data: &[u8], list: &[(String, Vec<u8>)]) -> Vec<u8> {
        let longest_at = |pos: usize| {
            list.iter().filter(|(_, v)| !v.is_empty() && data[pos..].starts_with(v)).fold(
                None,
                |best: Option<(usize, &String)>, (n, v)| match best {
                    Some((len, _)) if len >= v.len() => best,
                    _ => Some((v.len(), n)),
                },
            )
        };
        let mut out = Vec::new();
        let mut run: Option<(usize, Vec<&String>)> = None;
        for pos in 0..=data.len() {
            if run.as_ref().is_some_and(|(end, _)| pos >= *end) {
                for name in run.take().unwrap().1 {
                    out.extend(format!("[REDACTED:{name}]").bytes());
                }
            }
            if pos == data.len() {
                break;
            }
            if let Some((len, name)) = longest_at(pos) {
                match &mut run {
                    Some((end, names)) if pos + len > *end => {
                        *end = pos + len;
                        if !names.contains(&name) {
                            names.push(name);
                        }
                    }
                    Some(_) => {}
                    None => run = Some((pos + len, vec![name])),
                }
            }
            if run.is_none() {
                out.push(data[pos]);
            }
        }
        out
    }

    /// The bytes not covered by any occurrence of any secret.
    fn uncovered(data: &[u8], list: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut covered = vec![false; data.len()];
        for (_, value) in list.iter().filter(|(_, v)| !v.is_empty() && v.len() <= data.len()) {
            for start in 0..=data.len() - value.len() {
                if data[start..].starts_with(value) {
                    covered[start..start + value.len()].fill(true);
                }
            }
        }
        data.iter().zip(covered).filter(|(_, c)| !c).map(|(b, _)| *b).collect()
    }

    /// Output with every `[…]` label removed (test data never holds brackets).
    fn without_labels(out: &[u8]) -> Vec<u8> {
        let mut kept = Vec::new();
        let mut inside = false;
        for &b in out {
            match b {
                b'[' => inside = true,
                b']' => inside = false,
                _ if !inside => kept.push(b),
                _ => {}
            }
        }
        kept
    }

    #[test]
    fn replaces_each_occurrence_with_the_name() {
        assert_eq!(
            all("token=s3cret; again s3cret.", &[("TOKEN", "s3cret")]),
            "token=[REDACTED:TOKEN]; again [REDACTED:TOKEN]."
        );
        assert_eq!(all("s3crets3cret", &[("T", "s3cret")]), "[REDACTED:T][REDACTED:T]");
        assert_eq!(all("nothing here", &[("T", "s3cret")]), "nothing here");
        assert_eq!(all("s3cre", &[("T", "s3cret")]), "s3cre");
    }

    #[test]
    fn overlapping_secrets_leave_no_part_visible() {
        // A secret inside another: one label, the longer one's.
        assert_eq!(all("x abcdef y", &[("SHORT", "abc"), ("LONG", "abcdef")]), "x [REDACTED:LONG] y");
        // Sharing a stretch: both labels, nothing of either shown.
        assert_eq!(
            all("<tokenAAxy-BBBB>", &[("A", "tokenAAxy"), ("B", "xy-BBBB")]),
            "<[REDACTED:A][REDACTED:B]>"
        );
        // A secret overlapping itself.
        assert_eq!(all("aaaaa!", &[("A", "aaa")]), "[REDACTED:A]!");
        // Same value under two names: the first given names it.
        assert_eq!(all("dup", &[("FIRST", "dup"), ("SECOND", "dup")]), "[REDACTED:FIRST]");
    }

    #[test]
    fn empty_values_are_ignored_and_no_secrets_is_a_passthrough() {
        let mut r = Redactor::new(&secrets(&[("EMPTY", "")]));
        assert!(r.is_empty());
        assert_eq!(r.feed(b"partial line with no newline"), b"partial line with no newline");
        assert_eq!(r.finish(), b"");

        let shown = format!("{:?}", Redactor::new(&secrets(&[("T", "s3cret")])));
        assert!(shown.contains("\"T\"") && !shown.contains("s3cret"), "{shown}");

        let mut none = Redactor::new(&[]);
        assert!(none.is_empty());
        assert_eq!(none.feed(b"x"), b"x");
    }

    #[test]
    fn output_that_cannot_start_a_secret_is_not_held_back() {
        let mut r = Redactor::new(&secrets(&[("T", "s3cret")]));
        assert!(!r.is_empty());
        assert_eq!(r.feed(b"hello world\n"), b"hello world\n");
        // "s3" may begin the secret: held.
        assert_eq!(r.feed(b"prompt s3"), b"prompt ");
        assert_eq!(r.feed(b"x"), b"s3x");
        assert_eq!(r.feed(b"s3cr"), b"");
        assert_eq!(r.feed(b"et!"), b"[REDACTED:T]!");
        assert_eq!(r.feed(b"tail s3c"), b"tail ");
        assert_eq!(r.finish(), b"s3c");
        // Reusable after finish.
        // A run is labelled as soon as nothing can extend it.
        assert_eq!(r.feed(b"s3cret"), b"[REDACTED:T]");
        assert_eq!(r.finish(), b"");
    }

    #[test]
    fn replacing_puts_the_given_label_and_streams_the_same() {
        let list = secrets(&[("TOKEN", "tok-123456"), ("OTHER", "abc")]);
        let label = |name: &str| format!("placeholder-{name}").into_bytes();
        let data = b"a: tok-123456, b: abcabc, c: tok-12345".as_slice();
        let mut r = Redactor::replacing(&list, label);
        let whole = r.redact(data);
        assert_eq!(whole, b"a: placeholder-TOKEN, b: placeholder-OTHERplaceholder-OTHER, c: tok-12345");
        // Every split into two or three pieces gives the same.
        for a in 0..=data.len() {
            for b in a..=data.len() {
                let mut r = Redactor::replacing(&list, label);
                let mut out = r.feed(&data[..a]);
                out.extend(r.feed(&data[a..b]));
                out.extend(r.feed(&data[b..]));
                out.extend(r.finish());
                assert_eq!(out, whole, "split at {a} and {b}");
            }
        }
        // What is held back is never more than a value's length less one.
        let mut r = Redactor::replacing(&list, label);
        assert_eq!(r.feed(b"xx tok-12345"), b"xx ");
        assert_eq!(r.feed(b"6"), b"placeholder-TOKEN");
    }

    #[test]
    fn every_split_position_gives_the_one_shot_result() {
        let list =
            secrets(&[("A", "tokenAAxy"), ("B", "xy-BBBB"), ("C", "abc"), ("D", "abcdef"), ("E", "zz")]);
        let data = b"pre tokenAAxy-BBBB mid abcdefabc zzzzz abcde tokenAA xy-BBB abc".as_slice();
        let expected = redact_all(data, &list);
        assert_eq!(expected, reference(data, &list));
        assert_eq!(without_labels(&expected), uncovered(data, &list));
        for cut in 0..=data.len() {
            assert_eq!(streamed(data, &[cut], &list), expected, "split at {cut}");
        }
        for a in 0..=data.len() {
            for b in a..=data.len() {
                assert_eq!(streamed(data, &[a, b], &list), expected, "split at {a} and {b}");
            }
        }
        let bytewise: Vec<usize> = (1..data.len()).collect();
        assert_eq!(streamed(data, &bytewise, &list), expected);
    }

    #[test]
    fn random_inputs_match_the_reference_under_random_splits() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..400 {
            // A small alphabet makes overlaps and near-misses common.
            let count = 1 + next() % 4;
            let list: Vec<(String, Vec<u8>)> = (0..count)
                .map(|i| {
                    let len = 1 + next() % 5;
                    (format!("S{i}"), (0..len).map(|_| b"abc"[(next() % 3) as usize]).collect())
                })
                .collect();
            let data: Vec<u8> = (0..next() % 60).map(|_| b"abcd"[(next() % 4) as usize]).collect();
            let expected = reference(&data, &list);
            assert_eq!(redact_all(&data, &list), expected, "{list:?} {data:?}");
            assert_eq!(without_labels(&expected), uncovered(&data, &list), "{list:?} {data:?}");
            let mut cuts: Vec<usize> =
                (0..next() % 6).map(|_| (next() as usize) % (data.len() + 1)).collect();
            cuts.sort_unstable();
            assert_eq!(streamed(&data, &cuts, &list), expected, "{list:?} {data:?} {cuts:?}");
        }
    }
}
