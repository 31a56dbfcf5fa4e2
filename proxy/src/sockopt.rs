//! The one socket option the proxy sets without a safe wrapper: TCP_DEFER_ACCEPT.
//!
//! socket2, nix and rustix have no setter for it and std's is unstable, so this module
//! holds the workspace's only `unsafe` block: one `setsockopt` of an `int` on a borrowed
//! descriptor. Why the option is set, and on which listeners, is in `bind` (`lib.rs`)
//! and `docs/proxy.md`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// Sets TCP_DEFER_ACCEPT on a listening socket: a connection is accepted only once its
/// client's first bytes have arrived, or, for a client that sends nothing, after about
/// `secs` seconds (the kernel rounds it to SYN-ACK retransmissions: 1 s is one, after
/// which the client's next ACK makes the connection acceptable). 0 turns it off.
#[cfg(target_os = "linux")]
pub(crate) fn set_defer_accept(listener: &impl AsFd, secs: u32) -> io::Result<()> {
    let secs = i32::try_from(secs).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    set_int(
        listener.as_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_DEFER_ACCEPT,
        secs,
    )
}

/// `setsockopt(fd, level, name, &value, sizeof(int))`.
#[allow(unsafe_code)]
fn set_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: i32,
) -> io::Result<()> {
    let value: libc::c_int = value;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `fd` is borrowed, so the descriptor stays open for the whole call; the
    // option value points to a live, initialised `c_int` and `len` is exactly its size;
    // the kernel only reads those bytes during the call and keeps no pointer to them.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast::<libc::c_void>(),
            len,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    /// `getsockopt(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT)`, to read the option back (tests
    /// only; the proxy never reads it).
    #[allow(unsafe_code)]
    fn defer_accept(fd: BorrowedFd<'_>) -> io::Result<i32> {
        let mut value: libc::c_int = -1;
        let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `fd` is borrowed and open for the call; `value` and `len` are live,
        // initialised locals, `len` the size of `value`, and the kernel writes at most
        // `len` bytes to `value` and the actual length to `len`.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                std::ptr::from_mut(&mut value).cast::<libc::c_void>(),
                &mut len,
            )
        };
        if r == 0 {
            Ok(value)
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The next connection of a non-blocking listener, polled for at most `wait`.
    fn accept_within(l: &TcpListener, wait: Duration) -> TcpStream {
        let deadline = Instant::now() + wait;
        loop {
            match l.accept() {
                Ok((s, _)) => return s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "nothing accepted in {wait:?}");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn reads_back_what_was_set() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(defer_accept(l.as_fd()).unwrap(), 0);
        set_defer_accept(&l, 1).unwrap();
        assert_eq!(defer_accept(l.as_fd()).unwrap(), 1);
        set_defer_accept(&l, 0).unwrap();
        assert_eq!(defer_accept(l.as_fd()).unwrap(), 0);
    }

    #[test]
    fn out_of_range_is_an_error_not_a_wrap() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let e = set_defer_accept(&l, u32::MAX).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(defer_accept(l.as_fd()).unwrap(), 0);
    }

    /// A connection whose client has sent nothing is not accepted at once; one whose
    /// client has is; and the silent one is accepted after about a second.
    #[test]
    fn silent_clients_wait_in_the_kernel_then_are_accepted() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        set_defer_accept(&l, 1).unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let t0 = Instant::now();
        let _silent = TcpStream::connect(addr).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let e = l.accept().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "accepted before data");

        let mut talker = TcpStream::connect(addr).unwrap();
        talker.write_all(b"hi").unwrap();
        let mut s = accept_within(&l, Duration::from_secs(5));
        s.set_nonblocking(false).unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi", "the first one accepted is the one that spoke");

        // The silent one: after the SYN-ACK's retransmission (1 s on Linux) and its ACK.
        accept_within(&l, Duration::from_secs(10));
        assert!(
            t0.elapsed() >= Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
    }
}
