//! Sandbox names are per owner: two users can each have a sandbox `ci`, and
//! nothing a user can ask tells them whether another user has one.
//!
//! Root and the daemon's own user name sandboxes in the state directory's
//! own namespace (the one `airlock --direct` sees). Every other user's
//! names are stored with their prefix (`u1000-ci` for user 1000's `ci`), so
//! a user's name can never meet another user's, and everything they are
//! shown is their own name again. Root sees and addresses every sandbox by
//! its stored name. No one else may create a `u<UID>-…` name
//! (`state::check_name_owner`), so a prefix always means its owner.
//!
//! A sandbox a user created before names were per owner keeps its plain
//! name; its owner still reaches it by that name, when they have no
//! prefixed sandbox of the same name.

use airlock_runtime::state::{self, tenant_of, tenant_prefix, validate_name};

use crate::auth::Peer;
use crate::error::ApiError;

/// The longest stored name (`state::validate_name`'s limit).
const MAX_STORED: usize = 63;

/// Whose names a caller uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    /// `Some(uid)` for a user with a namespace of their own; `None` for root
    /// and the daemon's own user (the state directory's namespace).
    tenant: Option<u32>,
}

impl Scope {
    pub fn of(peer: &Peer, daemon_uid: u32) -> Scope {
        let own = peer.is_root() || peer.uid == daemon_uid;
        Scope { tenant: (!own).then_some(peer.uid) }
    }

    pub fn tenant(&self) -> Option<u32> {
        self.tenant
    }

    /// The stored name of `name` as this caller gives it (already a valid
    /// sandbox name).
    pub fn stored(&self, name: &str) -> Result<String, ApiError> {
        match self.tenant {
            None => Ok(name.to_owned()),
            Some(uid) => {
                let stored = format!("{}{name}", tenant_prefix(uid));
                if stored.len() > MAX_STORED {
                    return Err(ApiError::bad_request(
                        "invalid_name",
                        format!(
                            "invalid sandbox name {name:?}: your names are at most {} characters (the daemon \
                             keeps your sandboxes as {}NAME, within the 63 a name may have)",
                            MAX_STORED - tenant_prefix(uid).len(),
                            tenant_prefix(uid)
                        ),
                    ));
                }
                validate_name(&stored)?;
                Ok(stored)
            }
        }
    }

    /// A name this caller may create: a valid name of their own namespace
    /// (root may not take a name that belongs to another user's).
    pub fn creatable(&self, name: &str) -> Result<String, ApiError> {
        validate_name(name)?;
        let stored = self.stored(name)?;
        if self.tenant.is_none() {
            // Root and the daemon's user are the namespace's owner, so no
            // owner check applies except the reservation of the prefixes.
            if let Some(tenant) = tenant_of(&stored) {
                return Err(state::StateError::ReservedName { name: stored, tenant }.into());
            }
        }
        Ok(stored)
    }

    /// The plain name a tenant's pre-namespace sandbox may still have: only
    /// names that are not themselves in someone's namespace.
    pub fn legacy(&self, name: &str) -> Option<String> {
        self.tenant.filter(|_| tenant_of(name).is_none()).map(|_| name.to_owned())
    }

    /// The name this caller knows the sandbox stored as `stored` (owned by
    /// `owner`) by; `None` when it is not theirs to see.
    pub fn shown(&self, stored: &str, owner: u32) -> Option<String> {
        match self.tenant {
            None => Some(stored.to_owned()),
            Some(uid) if owner != uid => None,
            Some(uid) => match stored.strip_prefix(&tenant_prefix(uid)) {
                Some(plain) => Some(plain.to_owned()),
                None => self.legacy(stored),
            },
        }
    }

    /// Whether the state directory entry `stored` can be this caller's, from
    /// its name alone (a listing need not load anyone else's).
    pub fn may_hold(&self, stored: &str) -> bool {
        match self.tenant {
            None => true,
            Some(uid) => stored.starts_with(&tenant_prefix(uid)) || tenant_of(stored).is_none(),
        }
    }

    /// `error` with the stored name replaced by the one the caller gave
    /// (runtime errors name the directory).
    pub fn reword(&self, mut error: ApiError, stored: &str, shown: &str) -> ApiError {
        if stored != shown {
            error.message = error.message.replace(stored, shown);
        }
        error
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn peer(uid: u32) -> Peer {
        Peer { uid, gid: uid, pid: None }
    }

    #[test]
    fn each_user_names_their_own_sandboxes() {
        let root = Scope::of(&peer(0), 0);
        let alice = Scope::of(&peer(1000), 0);
        let bob = Scope::of(&peer(1001), 0);
        assert_eq!(root.stored("ci").unwrap(), "ci");
        assert_eq!(alice.stored("ci").unwrap(), "u1000-ci");
        assert_eq!(bob.stored("ci").unwrap(), "u1001-ci");
        // Naming someone else's stored name only reaches one's own.
        assert_eq!(alice.stored("u1001-ci").unwrap(), "u1000-u1001-ci");
        assert_eq!(alice.shown("u1000-ci", 1000).as_deref(), Some("ci"));
        assert_eq!(alice.shown("u1001-ci", 1001), None);
        assert_eq!(alice.shown("ci", 0), None);
        assert_eq!(alice.shown("old", 1000).as_deref(), Some("old"), "a sandbox from before");
        assert_eq!(root.shown("u1000-ci", 1000).as_deref(), Some("u1000-ci"));
        assert!(alice.may_hold("u1000-ci") && alice.may_hold("old") && !alice.may_hold("u1001-ci"));
        assert!(root.may_hold("u1001-ci"));
    }

    #[test]
    fn names_stay_within_the_limits() {
        let alice = Scope::of(&peer(1000), 0);
        let longest = "a".repeat(63 - "u1000-".len());
        assert!(alice.stored(&longest).is_ok());
        let err = alice.stored(&format!("{longest}a")).unwrap_err();
        assert_eq!(err.code, "invalid_name");
        assert!(err.message.contains("at most 57"), "{err}");
        let root = Scope::of(&peer(0), 0);
        assert_eq!(root.creatable("u1000-ci").unwrap_err().code, "invalid_name");
        assert_eq!(root.creatable("ci").unwrap(), "ci");
        assert_eq!(alice.creatable("u1001-ci").unwrap(), "u1000-u1001-ci");
        // A rootless daemon's own user has the plain namespace.
        assert_eq!(Scope::of(&peer(1000), 1000).stored("ci").unwrap(), "ci");
    }
}
