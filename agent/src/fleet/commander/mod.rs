//! The commander side of a fleet: `release …` (publish, promote, rollback,
//! freeze), `fleet status` and the live fleet page. It writes only Consul
//! keys, each with check-and-set, so a commander that dies mid-command
//! leaves either the old or the new value of a key, never a mix.

pub mod cli;
pub mod release;
pub mod view;
pub mod web;
