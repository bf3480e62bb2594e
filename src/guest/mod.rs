//! What the guest gets, planned as plain data before anything starts: the host's files it sees
//! and on what terms ([`shares`]), the files host programs take code from, which no share lets
//! it write ([`host_code`]), and what runs before each command ([`runtime`]).

pub mod host_code;
pub mod runtime;
pub mod shares;
