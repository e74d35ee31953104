//! The host side of a fleet: this agent as a member (tier key, percentage
//! bucket, freeze key) and its report to the commander. Each piece states its own crash guarantees; none of them
//! holds state that a restart cannot rebuild from Consul and the deploy root.

pub mod hostreport;
pub mod member;
