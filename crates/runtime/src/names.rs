//! Generated sandbox names ("brave-otter").
//!
//! A person types these names into every subcommand, so they are short,
//! pronounceable and lowercase ASCII. They are not secrets: the randomness only
//! has to make collisions rare, and `StateRoot::create_sandbox` retries on a
//! collision anyway.

use std::fs::File;
use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

const ADJECTIVES: [&str; 100] = [
    "able", "agile", "amber", "ample", "azure", "bold", "brave", "breezy", "bright", "brisk", "calm",
    "candid", "clever", "cosmic", "cozy", "crisp", "curious", "daring", "dapper", "deft", "eager", "early",
    "earnest", "easy", "elated", "epic", "fair", "fancy", "fearless", "fiery", "fleet", "fond", "frank",
    "fresh", "friendly", "frosty", "gentle", "giddy", "glad", "golden", "grand", "happy", "hardy", "hasty",
    "hearty", "honest", "humble", "icy", "jolly", "jovial", "keen", "kind", "lively", "loyal", "lucid",
    "lucky", "merry", "mighty", "mellow", "modest", "misty", "nimble", "noble", "patient", "plucky",
    "polite", "proud", "quick", "quiet", "rapid", "ready", "rosy", "rustic", "sandy", "shiny", "silent",
    "silver", "sleek", "smart", "snowy", "solid", "spry", "steady", "stellar", "stout", "sturdy", "sunny",
    "swift", "tidy", "tender", "tranquil", "trusty", "upbeat", "valiant", "vivid", "warm", "wise", "witty",
    "zany", "zesty",
];

const ANIMALS: [&str; 100] = [
    "aardvark", "alpaca", "ant", "antelope", "badger", "bat", "bear", "beaver", "bison", "bobcat", "buffalo",
    "camel", "caribou", "cat", "cheetah", "chipmunk", "cobra", "condor", "cougar", "coyote", "crab", "crane",
    "crow", "deer", "dingo", "dolphin", "donkey", "dove", "duck", "eagle", "eel", "elk", "emu", "falcon",
    "ferret", "finch", "fox", "frog", "gazelle", "gecko", "gerbil", "gibbon", "giraffe", "goat", "goose",
    "gopher", "gorilla", "hare", "hawk", "hedgehog", "heron", "hippo", "hornet", "horse", "hyena", "ibex",
    "ibis", "iguana", "impala", "jackal", "jaguar", "kestrel", "kiwi", "koala", "lemur", "leopard", "lion",
    "llama", "lobster", "lynx", "magpie", "marmot", "meerkat", "mole", "moose", "newt", "ocelot", "octopus",
    "okapi", "orca", "otter", "owl", "ox", "panda", "panther", "parrot", "pelican", "penguin", "puffin",
    "quail", "rabbit", "raven", "salmon", "seal", "sparrow", "stork", "swan", "tapir", "walrus", "wombat",
];

/// Returns a fresh "adjective-animal" name such as "brave-otter".
///
/// There are 10 000 combinations; callers that need uniqueness must check
/// (as `StateRoot::create_sandbox` does, atomically, with mkdir).
pub fn generate() -> String {
    let r = random_u32();
    let len = ADJECTIVES.len() as u32;
    // Both arrays have 100 entries, so the two indices come from disjoint
    // parts of `r` and every combination is reachable.
    let adjective = ADJECTIVES[(r % len) as usize];
    let animal = ANIMALS[((r / len) % ANIMALS.len() as u32) as usize];
    format!("{adjective}-{animal}")
}

/// Four random bytes from the kernel; when /dev/urandom cannot be read (an odd
/// chroot), the clock and pid still make consecutive calls differ, which is
/// all a name needs.
pub fn random_u32() -> u32 {
    let mut buf = [0u8; 4];
    let from_kernel = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf));
    if from_kernel.is_ok() {
        return u32::from_ne_bytes(buf);
    }
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    // Fold the 128-bit nanosecond count and mix in the pid; a multiplicative
    // hash spreads the low-entropy bits over the whole word.
    let folded = (nanos as u64) ^ ((nanos >> 64) as u64) ^ u64::from(std::process::id());
    (folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::state::validate_name;
    use std::collections::HashSet;

    #[test]
    fn word_lists_are_valid_and_distinct() {
        for list in [&ADJECTIVES[..], &ANIMALS[..]] {
            let unique: HashSet<_> = list.iter().collect();
            assert_eq!(unique.len(), list.len(), "duplicate word in list");
            for word in list {
                assert!(!word.is_empty());
                assert!(word.bytes().all(|b| b.is_ascii_lowercase()), "{word:?} is not lowercase ascii");
            }
        }
    }

    #[test]
    fn generated_names_pass_validation() {
        for _ in 0..500 {
            let name = generate();
            validate_name(&name).unwrap();
            let (adjective, animal) = name.split_once('-').unwrap();
            assert!(ADJECTIVES.contains(&adjective), "{name}");
            assert!(ANIMALS.contains(&animal), "{name}");
        }
    }

    #[test]
    fn generated_names_vary() {
        let names: HashSet<String> = (0..200).map(|_| generate()).collect();
        // 200 draws from 10 000 combinations: expect about two collisions.
        assert!(names.len() > 150, "only {} distinct names", names.len());
    }
}
