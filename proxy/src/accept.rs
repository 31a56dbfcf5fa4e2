//! Accepting client connections without registering them with the reactor up front.
//!
//! A client of a plaintext HTTP/1.1 listener has sent (the start of) its request by the
//! time its connection is accepted (the listener defers accepting until then:
//! TCP_DEFER_ACCEPT, see `bind` in `lib.rs`; a client silent for a second is accepted
//! anyway), and the response usually fits in the socket's send buffer. So, as HAProxy
//! does, an accepted socket is read and written directly (non-blocking), and is
//! registered with tokio's reactor (`epoll_ctl` ADD, and DEL when it closes) only when a
//! read or a write would block, and then for that direction only at first. A
//! `Connection: close` request answered at once costs two system calls fewer, and no
//! registration, readiness event or deregistration in the runtime; one whose request
//! comes after the accept costs no writability event; a connection whose write has to
//! wait becomes an ordinary [`TcpStream`]. A connection's last response, when the whole
//! of it is written at once before the shutdown, leaves with the FIN in one segment
//! ([`LazyTcp::last_before_shutdown`]).

use std::io::{self, IoSlice, Read};
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use socket2::SockRef;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A listening socket whose accepted sockets are not registered with the reactor.
pub(crate) struct Listener {
    inner: AsyncFd<mio::net::TcpListener>,
}

impl Listener {
    /// Wraps a listening socket (registered for readability only: accepts).
    pub(crate) fn new(listener: std::net::TcpListener) -> io::Result<Listener> {
        listener.set_nonblocking(true)?;
        // Deprecated as unsound for a `T` whose `as_raw_fd` may change or close its
        // descriptor; a mio listener owns its descriptor for its whole life, which is what
        // the replacement (`unsafe`, which the workspace denies) asks its caller to
        // promise.
        #[allow(deprecated)]
        let inner = AsyncFd::with_interest(
            mio::net::TcpListener::from_std(listener),
            Interest::READABLE,
        )?;
        Ok(Listener { inner })
    }

    /// The next connection (non-blocking and close-on-exec, from one `accept4` call).
    pub(crate) async fn accept(&self) -> io::Result<(LazyTcp, SocketAddr)> {
        loop {
            let mut ready = self.inner.readable().await?;
            match ready.try_io(|l| l.get_ref().accept()) {
                Ok(Ok((stream, peer))) => return Ok((LazyTcp::new(stream.into()), peer)),
                Ok(Err(e)) => return Err(e),
                // Would block: the readiness is cleared; wait for the next.
                Err(_) => {}
            }
        }
    }

    /// The address it listens on.
    #[cfg(test)]
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.get_ref().local_addr()
    }
}

impl std::os::fd::AsFd for Listener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.inner.get_ref().as_fd()
    }
}

/// An accepted TCP connection, registered with the reactor on its first read or write
/// that would block (see the module's documentation).
pub struct LazyTcp {
    state: State,
    /// Direct writes carry MSG_MORE: the connection's last bytes are being written and
    /// its shutdown follows (see [`LazyTcp::last_before_shutdown`]).
    more: bool,
}

enum State {
    /// Not registered: reads and writes go straight to the socket.
    Direct(std::net::TcpStream),
    /// Registered for readability only (a read would have blocked); writes still go
    /// straight to the socket. Registering for writability too would make the kernel
    /// report the fresh socket writable at once: an event, and often a turn of the event
    /// loop, for nothing.
    Reading(AsyncFd<std::net::TcpStream>),
    /// Registered for both (a write would have blocked, or a caller wanted a stream).
    Registered(TcpStream),
    /// Registration failed (the socket is closed); every operation fails.
    Failed,
}

impl std::fmt::Debug for LazyTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.state {
            State::Direct(_) => "LazyTcp::Direct",
            State::Reading(_) => "LazyTcp::Reading",
            State::Registered(_) => "LazyTcp::Registered",
            State::Failed => "LazyTcp::Failed",
        })
    }
}

fn failed() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the connection could not be registered with the reactor",
    )
}

/// Whether a direct operation's error means: register, and do it the reactor's way.
fn retry_registered(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

impl LazyTcp {
    /// Wraps an accepted socket, which must be in non-blocking mode.
    pub(crate) fn new(stream: std::net::TcpStream) -> LazyTcp {
        LazyTcp {
            state: State::Direct(stream),
            more: false,
        }
    }

    /// Declares that what is written from now on ends the connection's output: the
    /// caller writes it at once (the whole of it is in memory) and then shuts the
    /// connection down. Direct writes then carry MSG_MORE, so the kernel holds their
    /// last partial segment and `shutdown` sends it with the FIN, one segment instead of
    /// two. Nothing can be held for long: the shutdown pushes it, and so does a close (or
    /// a write that has to wait, which goes through the reactor without the flag).
    pub fn last_before_shutdown(&mut self) {
        self.more = true;
    }

    /// The connection as a registered tokio stream, for the paths that need one (TLS,
    /// protocol detection, raw TCP).
    pub fn into_registered(self) -> io::Result<TcpStream> {
        match self.state {
            State::Direct(s) => TcpStream::from_std(s),
            State::Reading(fd) => TcpStream::from_std(fd.into_inner()),
            State::Registered(s) => Ok(s),
            State::Failed => Err(failed()),
        }
    }

    /// Whether it is registered with the reactor (for reading at least).
    pub fn is_registered(&self) -> bool {
        !matches!(self.state, State::Direct(_))
    }

    /// The socket for a direct write or shutdown, unless it is registered for writing.
    fn unregistered_for_writes(&self) -> Option<&std::net::TcpStream> {
        match &self.state {
            State::Direct(s) => Some(s),
            State::Reading(fd) => Some(fd.get_ref()),
            _ => None,
        }
    }

    /// Registers the socket for readability (a read would have blocked). Edge-triggered
    /// registration reports bytes that came in meanwhile, so no wake-up is lost.
    fn register_reads(&mut self) -> io::Result<()> {
        if let State::Direct(_) = self.state {
            let State::Direct(s) = std::mem::replace(&mut self.state, State::Failed) else {
                return Err(failed());
            };
            // Deprecated as unsound for a `T` whose `as_raw_fd` may change or close its
            // descriptor; a std stream owns its descriptor for its whole life, which is
            // what the replacement (`unsafe`, which the workspace denies) asks its caller
            // to promise.
            #[allow(deprecated)]
            let fd = AsyncFd::with_interest(s, Interest::READABLE)?;
            self.state = State::Reading(fd);
        }
        Ok(())
    }

    /// Registers the socket for both directions (a write would have blocked) and returns
    /// the registered stream.
    fn register(&mut self) -> io::Result<&mut TcpStream> {
        if !matches!(self.state, State::Registered(_)) {
            let s = match std::mem::replace(&mut self.state, State::Failed) {
                State::Direct(s) => s,
                State::Reading(fd) => fd.into_inner(),
                _ => return Err(failed()),
            };
            self.state = State::Registered(TcpStream::from_std(s)?);
        }
        match &mut self.state {
            State::Registered(s) => Ok(s),
            _ => Err(failed()),
        }
    }

    /// A write `op` straight to the socket; when it would block, `then` on the stream
    /// registered for writing (which waits for writability).
    fn write_with<T>(
        &mut self,
        op: impl FnOnce(&std::net::TcpStream) -> io::Result<T>,
        then: impl FnOnce(Pin<&mut TcpStream>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if let Some(s) = self.unregistered_for_writes() {
            match op(s) {
                Err(e) if retry_registered(&e) => {}
                r => return Poll::Ready(r),
            }
        }
        match self.register() {
            Ok(s) => then(Pin::new(s)),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// The flags of a direct write: MSG_MORE when the shutdown follows (Linux; elsewhere the
/// response and the FIN go in two segments, as before).
fn more_flags(more: bool) -> i32 {
    #[cfg(target_os = "linux")]
    if more {
        return libc::MSG_MORE;
    }
    let _ = more;
    0
}

/// One read straight into `buf`. Safe code cannot read into uninitialised memory: free
/// space the caller did not initialise is zeroed first (the lean engine's buffers are
/// initialised memory, so nothing is zeroed for them).
fn read_into(s: &std::net::TcpStream, buf: &mut ReadBuf<'_>) -> io::Result<()> {
    let n = (&mut &*s).read(buf.initialize_unfilled())?;
    buf.advance(n);
    Ok(())
}

impl AsyncRead for LazyTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let State::Direct(s) = &this.state {
            match read_into(s, buf) {
                Err(e) if retry_registered(&e) => {}
                r => return Poll::Ready(r),
            }
            if let Err(e) = this.register_reads() {
                return Poll::Ready(Err(e));
            }
        }
        match &mut this.state {
            State::Reading(fd) => loop {
                let mut ready = match fd.poll_read_ready(cx) {
                    Poll::Ready(Ok(r)) => r,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                };
                let (room, before) = (buf.remaining(), buf.filled().len());
                // Err: it would block; the readiness is cleared, wait for the next.
                if let Ok(r) = ready.try_io(|fd| read_into(fd.get_ref(), buf)) {
                    // A read that took less than the room it had drained the socket (a
                    // stream socket's read takes all that is queued, up to the room): the
                    // readiness is cleared, as tokio's `TcpStream` does, so the next read
                    // waits for the next event instead of learning that from a read that
                    // would block (one syscall per keep-alive request). Closed states are
                    // not cleared: an end of stream that came with the bytes still reads.
                    let n = buf.filled().len() - before;
                    if r.is_ok() && n > 0 && n < room {
                        ready.clear_ready();
                    }
                    return Poll::Ready(r);
                }
            },
            State::Registered(s) => Pin::new(s).poll_read(cx, buf),
            _ => Poll::Ready(Err(failed())),
        }
    }
}

impl AsyncWrite for LazyTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let flags = more_flags(this.more);
        this.write_with(
            |s| SockRef::from(s).send_with_flags(buf, flags),
            |s| s.poll_write(cx, buf),
        )
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let flags = more_flags(this.more);
        this.write_with(
            |s| SockRef::from(s).send_vectored_with_flags(bufs, flags),
            |s| s.poll_write_vectored(cx, bufs),
        )
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(s) = this.unregistered_for_writes() {
            return Poll::Ready(s.shutdown(Shutdown::Write));
        }
        match &mut this.state {
            State::Registered(s) => Pin::new(s).poll_shutdown(cx),
            _ => Poll::Ready(Err(failed())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (LazyTcp, TcpStream) {
        let std_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l = Listener::new(std_l).unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = tokio::time::timeout(Duration::from_secs(5), l.accept())
            .await
            .unwrap()
            .unwrap();
        (server, client)
    }

    /// What the client reads until the end of the stream (at most 10 s).
    async fn read_to_end(client: &mut TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        got
    }

    /// Bytes already there are read without registering; a write that fits neither.
    #[tokio::test]
    async fn ready_io_stays_unregistered() {
        let (mut server, mut client) = pair().await;
        client.write_all(b"hello").await.unwrap();
        // Let the bytes arrive (loopback: at once, but give the kernel a moment).
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut buf = [0u8; 16];
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello");
        server.write_all(b"world").await.unwrap();
        server.shutdown().await.unwrap();
        assert!(!server.is_registered());
        let got = read_to_end(&mut client).await;
        assert_eq!(got, b"world");
    }

    /// A read that would block registers the socket and wakes when bytes come.
    #[tokio::test]
    async fn read_that_would_block_registers_and_wakes() {
        let (mut server, mut client) = pair().await;
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let n = server.read(&mut buf).await.unwrap();
            (buf[..n].to_vec(), server.is_registered())
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.write_all(b"late").await.unwrap();
        let (got, registered) = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"late");
        assert!(registered);
    }

    /// A write larger than the socket buffers registers the socket and completes as the
    /// peer reads.
    #[tokio::test]
    async fn write_that_would_block_registers_and_completes() {
        let (mut server, mut client) = pair().await;
        let big = vec![7u8; 8 * 1024 * 1024];
        let writer = tokio::spawn(async move {
            server.write_all(&big).await.unwrap();
            server.shutdown().await.unwrap();
            server.is_registered()
        });
        let got = read_to_end(&mut client).await;
        assert_eq!(got.len(), 8 * 1024 * 1024);
        assert!(got.iter().all(|&b| b == 7));
        assert!(writer.await.unwrap());
    }

    /// A connection registered for reading only (its first read waited) is registered
    /// for writing too when a write would block, and keeps reading.
    #[tokio::test]
    async fn reading_then_a_write_that_would_block() {
        let (mut server, mut client) = pair().await;
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let n = server.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"first");
            assert!(matches!(server.state, State::Reading(_)));
            server.write_all(&vec![3u8; 8 * 1024 * 1024]).await.unwrap();
            assert!(matches!(server.state, State::Registered(_)));
            let n = server.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"second");
            server.shutdown().await.unwrap();
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.write_all(b"first").await.unwrap();
        let mut got = vec![0u8; 8 * 1024 * 1024];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert!(got.iter().all(|&b| b == 3));
        client.write_all(b"second").await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert!(rest.is_empty());
        task.await.unwrap();
    }

    /// A short read clears the readiness (no read that would block after it), and loses
    /// neither the bytes that come later nor an end of stream that came with the bytes.
    #[tokio::test]
    async fn a_short_read_waits_for_the_next_bytes_and_keeps_the_end() {
        let (mut server, mut client) = pair().await;
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let mut got = Vec::new();
            loop {
                let n = server.read(&mut buf).await.unwrap();
                assert!(matches!(server.state, State::Reading(_)));
                if n == 0 {
                    return got;
                }
                got.extend_from_slice(&buf[..n]);
            }
        });
        // Registered for reading first (its first read would block), then pieces with
        // pauses, the last with the FIN.
        for part in [&b"one"[..], b"two"] {
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.write_all(part).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.write_all(b"end").await.unwrap();
        client.shutdown().await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("a wake-up was lost")
            .unwrap();
        assert_eq!(got, b"onetwoend");
    }

    /// The end of the stream reads as 0 bytes, unregistered.
    #[tokio::test]
    async fn eof_reads_zero() {
        let (mut server, client) = pair().await;
        drop(client);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);
    }

    /// The last bytes before a shutdown wait for it (on Linux, MSG_MORE holds a partial
    /// segment), then arrive with the end of the stream.
    #[tokio::test]
    async fn last_bytes_leave_with_the_shutdown() {
        let (mut server, mut client) = pair().await;
        server.last_before_shutdown();
        server.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        assert!(!server.is_registered());
        #[cfg(target_os = "linux")]
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut b = [0u8; 64];
            let e = client.try_read(&mut b).unwrap_err();
            assert_eq!(
                e.kind(),
                io::ErrorKind::WouldBlock,
                "sent before the shutdown"
            );
        }
        server.shutdown().await.unwrap();
        let got = read_to_end(&mut client).await;
        assert_eq!(got, b"HTTP/1.1 200 OK\r\n\r\n");
    }

    /// Bytes written as the last ones are not lost when the socket is closed without a
    /// shutdown: the close sends them.
    #[tokio::test]
    async fn last_bytes_leave_with_a_close() {
        let (mut server, mut client) = pair().await;
        server.last_before_shutdown();
        server.write_all(b"bye").await.unwrap();
        drop(server);
        let got = read_to_end(&mut client).await;
        assert_eq!(got, b"bye");
    }

    /// A last write larger than the socket buffers waits through the reactor and
    /// completes.
    #[tokio::test]
    async fn a_large_last_write_completes() {
        let (mut server, mut client) = pair().await;
        let writer = tokio::spawn(async move {
            server.last_before_shutdown();
            server.write_all(&vec![5u8; 8 * 1024 * 1024]).await.unwrap();
            server.shutdown().await.unwrap();
        });
        let got = read_to_end(&mut client).await;
        assert_eq!(got.len(), 8 * 1024 * 1024);
        assert!(got.iter().all(|&b| b == 5));
        writer.await.unwrap();
    }

    /// The registered stream is the same connection.
    #[tokio::test]
    async fn into_registered_keeps_the_socket() {
        let (server, mut client) = pair().await;
        let mut s = server.into_registered().unwrap();
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        client.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"x");
    }
}
