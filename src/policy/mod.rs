//! Destination policy: which targets may be reached ([`acl`]) and how ([`route`]).

pub mod acl;
pub mod pattern;
pub mod route;

pub use acl::Acl;
