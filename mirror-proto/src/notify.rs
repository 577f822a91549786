//! Telling the service manager how the service is doing (systemd's `Type=notify`, the protocol
//! of sd_notify(3)): one datagram of `KEY=VALUE` lines to the unix socket named by
//! `$NOTIFY_SOCKET`; an abstract-namespace socket when the name starts with `@`. Without
//! `$NOTIFY_SOCKET` (not run by such a manager) nothing is sent.
//!
//! `serve` of both programs sends `READY=1` once its sockets accept connections and
//! `STOPPING=1` when a signal starts its shutdown.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

use log::{debug, warn};

/// Sends `state` (e.g. `"READY=1\nSTATUS=serving"`) to `$NOTIFY_SOCKET` if it is set; a
/// failure is logged, not returned (the service works without the manager hearing of it).
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    match send(&socket, state) {
        Ok(()) => debug!("told the service manager {state:?}"),
        Err(e) => warn!(
            "cannot tell the service manager {state:?} through NOTIFY_SOCKET={}: {e}",
            socket.to_string_lossy()
        ),
    }
}

/// Sends `state` as one datagram to the notification socket `socket` (a path, or `@name`).
pub fn send(socket: &OsStr, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let name = socket.as_bytes();
    let sent = match name.first() {
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name[1..])?;
            sock.send_to_addr(state.as_bytes(), &addr)?
        }
        Some(b'/') => sock.send_to(state.as_bytes(), Path::new(socket))?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not an absolute path or an abstract socket (@name)",
            ))
        }
    };
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "the datagram was cut short",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_or_an_abstract_socket() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1").unwrap();
        assert_eq!(recv(&sock), "READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("vhost-mirror-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        send(OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        assert_eq!(recv(&sock), "STOPPING=1");

        assert!(send(OsStr::new("relative/path"), "READY=1").is_err());
        assert!(send(OsStr::new(""), "READY=1").is_err());
        assert!(send(d.path().join("nobody-listens").as_os_str(), "READY=1").is_err());
    }
}
