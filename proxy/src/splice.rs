//! Zero-copy relaying of plain TCP on Linux: each direction moves bytes socket → pipe →
//! socket with `splice(2)`, so the payload never enters user space. Readiness comes from
//! tokio (`readable`/`writable` + `try_io`), so a would-block clears the readiness and
//! the task sleeps until the socket is ready again. End of stream is passed on as a
//! half-close, like the copy loop in [`crate::tcp`], which stays the fallback when a pipe
//! cannot be made (out of file descriptors).

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// The pipe capacity asked for, and the most bytes one `splice` call moves. A larger pipe
/// than the default 64 KiB lets one call move a whole socket buffer's worth, halving the
/// calls (and wake-ups) per megabyte; pages are only taken as bytes sit in the pipe.
const PIPE_BYTES: usize = 256 * 1024;

/// Most bytes moved by one `splice` call when the pipe keeps its default capacity.
const DEFAULT_PIPE_BYTES: usize = 64 * 1024;

/// A pipe whose both ends are non-blocking.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Its capacity: [`PIPE_BYTES`], or the default when the system refused to grow it
    /// (e.g. over `/proc/sys/fs/pipe-user-pages-soft`).
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let capacity = match nix::fcntl::fcntl(
            &write,
            nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES as i32),
        ) {
            Ok(n) if n > 0 => n as usize,
            _ => DEFAULT_PIPE_BYTES,
        };
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

/// Relays `a <-> b` until both directions end (or the idle timeout passes). Returns
/// (bytes a->b, bytes b->a, whether the idle timeout ended it), or `Err` with both streams
/// untouched when no pipe could be made, so the caller can fall back to copying.
pub(crate) async fn relay(
    a: &TcpStream,
    b: &TcpStream,
    idle: Option<Duration>,
) -> Result<(u64, u64, bool), io::Error> {
    let (ab_pipe, ba_pipe) = (Pipe::new()?, Pipe::new()?);
    let activity = AtomicU64::new(0);
    let ab_count = AtomicU64::new(0);
    let ba_count = AtomicU64::new(0);
    let copy = async {
        let ab = one_way(a, b, &ab_pipe, &ab_count, &activity);
        let ba = one_way(b, a, &ba_pipe, &ba_count, &activity);
        let _ = tokio::join!(ab, ba);
    };
    let timed_out = match idle {
        None => {
            copy.await;
            false
        }
        Some(idle) => tokio::select! {
            _ = copy => false,
            _ = crate::tcp::idle_watch(&activity, idle) => true,
        },
    };
    Ok((
        ab_count.load(Ordering::Relaxed),
        ba_count.load(Ordering::Relaxed),
        timed_out,
    ))
}

/// Moves `r`'s bytes to `w` through `pipe` until `r` ends, then half-closes `w`.
async fn one_way(
    r: &TcpStream,
    w: &TcpStream,
    pipe: &Pipe,
    count: &AtomicU64,
    activity: &AtomicU64,
) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    // Bytes sitting in the pipe, read from `r` but not yet written to `w`.
    let mut pending = 0usize;
    loop {
        if pending == 0 {
            let n = loop {
                r.readable().await?;
                match r.try_io(Interest::READABLE, || {
                    splice(
                        r.as_fd(),
                        None,
                        pipe.write.as_fd(),
                        None,
                        pipe.capacity,
                        flags,
                    )
                    .map_err(io::Error::from)
                }) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            };
            activity.fetch_add(1, Ordering::Relaxed);
            if n == 0 {
                // Pass the end of stream on, but keep the other direction open.
                return socket2::SockRef::from(w).shutdown(Shutdown::Write);
            }
            pending = n;
        }
        w.writable().await?;
        match w.try_io(Interest::WRITABLE, || {
            splice(pipe.read.as_fd(), None, w.as_fd(), None, pending, flags)
                .map_err(io::Error::from)
        }) {
            Ok(n) => {
                pending -= n;
                count.fetch_add(n as u64, Ordering::Relaxed);
                activity.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected pair of loopback TCP streams.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close_and_counts() {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let task = tokio::spawn(async move { relay(&a, &b, Some(Duration::from_secs(10))).await });
        // 3 MiB one way (more than a pipe holds), then half-close.
        let payload: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), server.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert!(got == payload, "payload differs after relaying");
        let mut client = writer.await.unwrap();
        // The other direction still works after the half-close.
        server.write_all(b"world!").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, b"world!");
        let (ab, ba, idle) = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!((ab, ba, idle), (payload.len() as u64, 6, false));
    }

    #[tokio::test]
    async fn idle_relay_times_out() {
        let (_client, a) = pair().await;
        let (b, _server) = pair().await;
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            relay(&a, &b, Some(Duration::from_millis(200))),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(r, (0, 0, true));
    }
}
