//! The listeners: one UDP socket and one TCP listener on the same address and port.
//!
//! UDP: each worker task receives a datagram, answers local and cached names inline, and
//! spawns a task only for a query that must go upstream (at most `max_inflight` at once;
//! beyond that, queries are dropped and the client retries, as an overloaded resolver
//! would). TCP (RFC 7766): two-byte length-prefixed messages, several per connection and
//! pipelined: each query is answered as soon as its answer is ready, so a local name is not
//! held up behind a slow upstream one and replies may leave out of order, the client
//! matching them by ID (RFC 7766 sections 6.2.1.1 and 7); at most [`TCP_PIPELINE`]
//! upstream-bound queries per connection are in progress, further reads wait. An idle
//! connection is closed after [`TCP_IDLE`] (RFC 7766 section 6.2.3), once the queries it
//! sent are answered; at most `max_tcp_connections` are open at once.
//!
//! Every task is owned by a `JoinSet`, so dropping the shim's handle stops everything.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::handler::{Handler, Step, Transport};

/// How long a TCP connection may sit without a query.
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// Upstream-bound queries in progress at once on one TCP connection.
pub const TCP_PIPELINE: usize = 32;
/// How long one TCP message (after its length) may take to arrive or be written.
const TCP_IO: Duration = Duration::from_secs(5);
/// Receive buffer asked for the UDP socket, so bursts are queued rather than lost.
const UDP_RECV_BUFFER: usize = 4 << 20;

/// Binds UDP on `listen` and TCP on the same address and port. With port 0 the kernel
/// picks the UDP port; if TCP cannot have it, another is tried (a bounded number of times).
pub async fn bind(listen: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..20 {
        let udp = bind_udp(listen)?;
        let addr = udp.local_addr()?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if listen.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => {
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free port for UDP and TCP")))
}

fn bind_udp(listen: SocketAddr) -> io::Result<UdpSocket> {
    let domain = socket2::Domain::for_address(listen);
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: the kernel caps it at net.core.rmem_max.
    let _ = sock.set_recv_buffer_size(UDP_RECV_BUFFER);
    sock.set_nonblocking(true)?;
    sock.bind(&listen.into())?;
    UdpSocket::from_std(sock.into())
}

/// Receives and answers UDP queries until the task is aborted.
///
/// On Linux it receives up to [`batch::SIZE`] datagrams per `recvmmsg(2)` and sends the
/// replies of a batch with one `sendmmsg(2)`: under load that halves the system calls per
/// query (the kernel's per-packet work is the bulk of the cost of a local answer).
/// Elsewhere, one `recv_from` and one `send_to` per query.
pub async fn udp_loop(sock: Arc<UdpSocket>, handler: Arc<Handler>, inflight: Arc<Semaphore>) {
    let mut tasks = JoinSet::new();
    #[cfg(target_os = "linux")]
    {
        let mut bufs: Vec<Vec<u8>> = (0..batch::SIZE).map(|_| vec![0u8; batch::SLOT]).collect();
        let mut got = Vec::with_capacity(batch::SIZE);
        let mut replies = Vec::with_capacity(batch::SIZE);
        loop {
            got.clear();
            match batch::recv(&sock, &mut bufs, &mut got) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = sock.readable().await {
                        tracing::debug!(error = %e, "UDP socket not readable");
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "UDP receive failed");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
            }
            for &(i, n, src) in &got {
                let packet = bufs.get(i).and_then(|b| b.get(..n)).unwrap_or_default();
                if let Some(reply) = step(&sock, &handler, &inflight, &mut tasks, packet, src) {
                    replies.push((reply, src));
                }
            }
            flush(&sock, &mut replies).await;
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        // Room for any datagram, so an oversized query is seen whole.
        let mut buf = vec![0u8; 65_536];
        loop {
            let (n, src) = match sock.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "UDP receive failed");
                    // Some errors repeat (e.g. ENOMEM); do not spin on them.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
            };
            let packet = buf.get(..n).unwrap_or_default();
            if let Some(reply) = step(&sock, &handler, &inflight, &mut tasks, packet, src) {
                send(&sock, &reply, src).await;
            }
        }
    }
}

/// Handles one datagram: returns the reply to send now, or spawns the upstream work
/// (which sends its own reply) and returns nothing.
fn step(
    sock: &Arc<UdpSocket>,
    handler: &Arc<Handler>,
    inflight: &Arc<Semaphore>,
    tasks: &mut JoinSet<()>,
    packet: &[u8],
    src: SocketAddr,
) -> Option<Vec<u8>> {
    match handler.handle(packet, src.ip(), Transport::Udp) {
        Step::Reply(bytes) => Some(bytes),
        Step::Drop => None,
        Step::Forward(p) => {
            match inflight.clone().try_acquire_owned() {
                Ok(permit) => {
                    while tasks.try_join_next().is_some() {}
                    let (sock, handler) = (sock.clone(), handler.clone());
                    tasks.spawn(async move {
                        let bytes = handler.resolve(p).await;
                        send(&sock, &bytes, src).await;
                        drop(permit);
                    });
                }
                Err(_) => handler.dropped(&p),
            }
            None
        }
    }
}

/// Sends a batch of replies: `sendmmsg` while the socket takes them, a plain (waiting)
/// `send_to` for one that it does not.
#[cfg(target_os = "linux")]
async fn flush(sock: &UdpSocket, replies: &mut Vec<(Vec<u8>, SocketAddr)>) {
    let mut start = 0;
    while let Some(rest) = replies.get(start..).filter(|r| !r.is_empty()) {
        match batch::send(sock, rest) {
            Ok(n) if n > 0 => start += n,
            _ => {
                if let Some((bytes, to)) = rest.first() {
                    send(sock, bytes, *to).await;
                }
                start += 1;
            }
        }
    }
    replies.clear();
}

/// `recvmmsg(2)`/`sendmmsg(2)` through nix's safe wrappers, on a tokio socket.
#[cfg(target_os = "linux")]
mod batch {
    use std::io::{self, IoSlice, IoSliceMut};
    use std::net::SocketAddr;
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{
        ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg,
    };
    use tokio::io::Interest;
    use tokio::net::UdpSocket;

    /// Datagrams per system call.
    pub const SIZE: usize = 32;
    /// Bytes per received datagram: a larger query is truncated by the kernel and dropped
    /// (no stub resolver sends UDP queries anywhere near this size).
    pub const SLOT: usize = 4096;

    /// Receives what is queued (up to `bufs.len()` datagrams) without waiting; pushes
    /// `(buffer index, length, source)` for each whole datagram.
    pub fn recv(
        sock: &UdpSocket,
        bufs: &mut [Vec<u8>],
        out: &mut Vec<(usize, usize, SocketAddr)>,
    ) -> io::Result<()> {
        sock.try_io(Interest::READABLE, || {
            let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(bufs.len(), None);
            let mut iovs: Vec<[IoSliceMut<'_>; 1]> = bufs
                .iter_mut()
                .map(|b| [IoSliceMut::new(b.as_mut_slice())])
                .collect();
            let results = recvmmsg(
                sock.as_raw_fd(),
                &mut headers,
                iovs.iter_mut(),
                MsgFlags::MSG_DONTWAIT,
                None,
            )?;
            for (i, m) in results.enumerate() {
                if m.flags.contains(MsgFlags::MSG_TRUNC) {
                    continue;
                }
                if let Some(addr) = m.address.as_ref().and_then(socket_addr) {
                    out.push((i, m.bytes, addr));
                }
            }
            Ok(())
        })
    }

    /// Sends as many of `replies` as the socket takes now; returns how many.
    pub fn send(sock: &UdpSocket, replies: &[(Vec<u8>, SocketAddr)]) -> io::Result<usize> {
        sock.try_io(Interest::WRITABLE, || {
            let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(replies.len(), None);
            let slices: Vec<[IoSlice<'_>; 1]> =
                replies.iter().map(|(b, _)| [IoSlice::new(b)]).collect();
            let addrs: Vec<Option<SockaddrStorage>> = replies
                .iter()
                .map(|(_, a)| Some(SockaddrStorage::from(*a)))
                .collect();
            let no_cmsgs: [ControlMessage<'_>; 0] = [];
            let results = sendmmsg(
                sock.as_raw_fd(),
                &mut headers,
                &slices,
                &addrs,
                no_cmsgs,
                MsgFlags::MSG_DONTWAIT,
            )?;
            Ok(results.count())
        })
    }

    fn socket_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
        if let Some(v4) = s.as_sockaddr_in() {
            return Some(SocketAddr::V4((*v4).into()));
        }
        s.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
    }
}

async fn send(sock: &UdpSocket, bytes: &[u8], to: SocketAddr) {
    if let Err(e) = sock.send_to(bytes, to).await {
        tracing::debug!(%to, error = %e, "UDP send failed");
    }
}

/// Accepts TCP connections until the task is aborted.
pub async fn tcp_loop(listener: TcpListener, handler: Arc<Handler>, max_connections: usize) {
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut conns = JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "TCP accept failed");
                // EMFILE and friends repeat until a connection closes: back off a little.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many TCP connections, closing");
            continue;
        };
        let handler = handler.clone();
        conns.spawn(async move {
            serve_tcp(stream, peer, &handler).await;
            drop(permit);
        });
    }
}

async fn serve_tcp(stream: TcpStream, peer: SocketAddr, handler: &Arc<Handler>) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_PIPELINE);
    let writer = async move {
        while let Some(reply) = rx.recv().await {
            let Ok(len) = u16::try_from(reply.len()) else {
                continue;
            };
            let mut framed = Vec::with_capacity(reply.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&reply);
            match timeout(TCP_IO, wr.write_all(&framed)).await {
                Ok(Ok(())) => {}
                // The client is gone or stuck: stop writing; the reader ends on its own.
                _ => return,
            }
        }
    };
    let reader = async move {
        let slots = Arc::new(Semaphore::new(TCP_PIPELINE));
        let mut pending = JoinSet::new();
        loop {
            while pending.try_join_next().is_some() {}
            let mut len = [0u8; 2];
            match timeout(TCP_IDLE, rd.read_exact(&mut len)).await {
                Ok(Ok(_)) => {}
                _ => break,
            }
            let n = usize::from(u16::from_be_bytes(len));
            if n == 0 {
                break;
            }
            let mut buf = vec![0u8; n];
            match timeout(TCP_IO, rd.read_exact(&mut buf)).await {
                Ok(Ok(_)) => {}
                _ => break,
            }
            match handler.handle(&buf, peer.ip(), Transport::Tcp) {
                Step::Reply(bytes) => {
                    if tx.send(bytes).await.is_err() {
                        break;
                    }
                }
                Step::Drop => {}
                Step::Forward(p) => {
                    let Ok(permit) = slots.clone().acquire_owned().await else {
                        break;
                    };
                    let (handler, tx) = (handler.clone(), tx.clone());
                    pending.spawn(async move {
                        let bytes = handler.resolve(p).await;
                        let _ = tx.send(bytes).await;
                        drop(permit);
                    });
                }
            }
        }
        // Answer what was asked before the connection closes (each resolve is bounded by
        // the upstream timeouts), then let the writer finish.
        while pending.join_next().await.is_some() {}
        drop(tx);
    };
    tokio::join!(reader, writer);
}
