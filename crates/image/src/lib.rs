//! OCI images as a sandbox's root: safe unpacking of hostile layers, a
//! content-addressed store, and the sources images come from.

pub mod auth;
pub mod source;
pub mod store;
pub mod unpack;
pub mod user;
