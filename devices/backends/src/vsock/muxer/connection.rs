//! One bridged connection: its host socket, its state, and the credit both ways.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

use super::CONN_BUF_ALLOC;

/// A connection is named by (host port, guest port).
pub(super) type Key = (u32, u32);

#[derive(Debug, PartialEq, Eq)]
pub(super) enum State {
    /// Host side asked (REQUEST sent); waiting for the guest's RESPONSE.
    HostConnecting,
    Established,
    /// cvm sent SHUTDOWN (the host socket hung up); waiting for the guest's RST.
    Closing,
}

pub(super) struct Conn {
    pub(super) stream: UnixStream,
    pub(super) token: u64,
    pub(super) state: State,
    /// Guest data not yet written to the host socket; bounded by CONN_BUF_ALLOC.
    pub(super) to_host: VecDeque<u8>,
    /// Bytes of guest data written to the host socket, and how many of them the guest knows.
    pub(super) fwd_cnt: u32,
    pub(super) fwd_cnt_told: u32,
    /// Guest asked to stop sending to it / said it sends no more.
    pub(super) peer_shut_send: bool,
    /// Bytes sent to the guest, and the guest's last word on its buffer.
    pub(super) rx_cnt: u32,
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: u32,
    /// In the ready list, or waiting for credit.
    pub(super) rx_queued: bool,
    pub(super) credit_blocked: bool,
    pub(super) interest: EventSet,
    /// The host socket hung up, or its end was read to the last byte: no longer watched.
    /// (epoll reports a hang-up whatever the interest, so a watched one would fire for as
    /// long as the guest keeps its end open.)
    pub(super) unwatched: bool,
}

impl Conn {
    pub(super) fn new(stream: UnixStream, token: u64, state: State) -> Self {
        Self {
            stream,
            token,
            state,
            to_host: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            peer_shut_send: false,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_queued: false,
            credit_blocked: false,
            interest: EventSet::empty(),
            unwatched: false,
        }
    }

    /// Bytes the guest can take now.
    pub(super) fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Writes buffered guest data to the host socket; returns false when the socket is gone.
    pub(super) fn flush(&mut self) -> bool {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return false,
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if self.peer_shut_send {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        true
    }

    /// Whether the guest should hear about consumed bytes now rather than with later traffic.
    pub(super) fn owes_credit_update(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.fwd_cnt_told) >= CONN_BUF_ALLOC / 2
    }
}
