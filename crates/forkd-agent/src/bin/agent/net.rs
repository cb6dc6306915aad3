//! Bring a forked child's NIC up: address, default route, resolver.
//!
//! The parent was snapshotted with its NIC present but unplugged (no back end on the host),
//! so the interface exists in every child, down. A child forked with a network gets a back
//! end; this turns the link on. It is done with ioctls, not `ip`, because a recipe's root file
//! system need not have iproute2 (busybox images have a different `ip`, minimal ones none).

use forkd_agent::NetSetup;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The first NIC backed by a device (not `lo`, not a virtual interface), by name.
fn first_nic() -> Result<String, String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map_err(|e| format!("cannot list /sys/class/net: {e}"))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("device").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names.into_iter().next().ok_or_else(|| {
        "no network interface: the guest kernel has no driver for the NIC (virtio_net)".into()
    })
}

fn ifreq_for(name: &str) -> Result<libc::ifreq, String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(format!("interface name {name:?} is too long"));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

fn sockaddr_in(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and sockaddr has no
    // invalid bit patterns; this is the cast the socket API itself expects.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl_raw(sock: &OwnedFd, req: libc::c_ulong, arg: *mut libc::c_void) -> std::io::Result<()> {
    // SAFETY: `arg` points at a live ifreq or rtentry of the type `req` takes, owned by the
    // caller for the duration of the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), req as _, arg) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn ioctl(
    sock: &OwnedFd,
    req: libc::c_ulong,
    arg: *mut libc::c_void,
    what: &str,
) -> Result<(), String> {
    ioctl_raw(sock, req, arg).map_err(|e| format!("{what}: {e}"))
}

fn parse(s: &str, what: &str) -> Result<Ipv4Addr, String> {
    s.parse()
        .map_err(|_| format!("{what} {s:?} is not an IPv4 address"))
}

/// Set or clear IFF_UP on `name` (a no-op when it already is so).
fn set_up(sock: &OwnedFd, name: &str, up: bool) -> Result<(), String> {
    let mut req = ifreq_for(name)?;
    ioctl(
        sock,
        libc::SIOCGIFFLAGS,
        (&raw mut req).cast(),
        "SIOCGIFFLAGS",
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let bit = libc::IFF_UP as libc::c_short;
    if (flags & bit != 0) == up {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = if up { flags | bit } else { flags & !bit };
    ioctl(
        sock,
        libc::SIOCSIFFLAGS,
        (&raw mut req).cast(),
        "SIOCSIFFLAGS",
    )
}

fn inet_socket() -> Result<OwnedFd, String> {
    // SAFETY: plain socket(2); the descriptor is owned by the OwnedFd from here on.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// How long to wait for the link to come up. The host plugs the NIC in as the child resumes;
/// the kernel may take up to a second (its link-watch delay) to start sending on it.
const CARRIER_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Wait until `name` has carrier, so that "ready" means the network works: a packet sent
/// before that is dropped, and a TCP SYN would wait a second to retry. Carrier, not
/// `operstate`: the kernel starts sending as soon as an interface that has carrier is up,
/// while `operstate` follows up to a second later (link-watch; measured: ~550 ms under TCG).
fn wait_for_carrier(name: &str) {
    let path = format!("/sys/class/net/{name}/carrier");
    let start = std::time::Instant::now();
    while start.elapsed() < CARRIER_WAIT {
        if std::fs::read_to_string(&path).is_ok_and(|s| s.trim() == "1") {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Whether `name` is up with the address `addr` (configured by [`prepare`] in the parent).
fn configured_as(sock: &OwnedFd, name: &str, addr: Ipv4Addr) -> bool {
    let Ok(mut req) = ifreq_for(name) else {
        return false;
    };
    if ioctl_raw(sock, libc::SIOCGIFADDR, (&raw mut req).cast()).is_err() {
        return false;
    }
    // SAFETY: SIOCGIFADDR filled the address member of the union with a sockaddr_in.
    let got: libc::sockaddr_in = unsafe { std::mem::transmute(req.ifr_ifru.ifru_addr) };
    if Ipv4Addr::from(u32::from_be(got.sin_addr.s_addr)) != addr {
        return false;
    }
    let Ok(mut req) = ifreq_for(name) else {
        return false;
    };
    if ioctl_raw(sock, libc::SIOCGIFFLAGS, (&raw mut req).cast()).is_err() {
        return false;
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags & libc::IFF_UP as libc::c_short != 0 }
}

/// Address, mask, up, default route, on `name`; and routes through a link without carrier
/// ignored, so that while the NIC is unplugged a connect fails at once ("Network is
/// unreachable") instead of waiting for a SYN that can never leave.
fn configure(sock: &OwnedFd, name: &str, net: &NetSetup) -> Result<(), String> {
    let addr = parse(&net.addr, "address")?;
    let gw = parse(&net.gateway, "gateway")?;
    if net.prefix == 0 || net.prefix > 30 {
        return Err(format!("prefix /{} is out of range (1-30)", net.prefix));
    }
    let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(net.prefix)));
    for conf in ["all", name] {
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv4/conf/{conf}/ignore_routes_with_linkdown"),
            "1",
        );
    }
    let mut req = ifreq_for(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(addr);
    ioctl(
        sock,
        libc::SIOCSIFADDR,
        (&raw mut req).cast(),
        "SIOCSIFADDR",
    )?;
    let mut req = ifreq_for(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr_in(mask);
    ioctl(
        sock,
        libc::SIOCSIFNETMASK,
        (&raw mut req).cast(),
        "SIOCSIFNETMASK",
    )?;
    set_up(sock, name, true)?;
    // SAFETY: rtentry is plain old data; all-zero is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_in(gw);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    match ioctl_raw(sock, libc::SIOCADDRT, (&raw mut rt).cast()) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(format!("SIOCADDRT: {e}")),
    }
}

fn write_resolver(net: &NetSetup) -> Result<(), String> {
    let dns = parse(&net.dns, "name server")?;
    let want = format!("nameserver {dns}\n");
    // Best effort: a read-only root keeps whatever resolver the image has.
    if std::fs::read_to_string("/etc/resolv.conf").ok().as_deref() != Some(want.as_str()) {
        let _ = std::fs::write("/etc/resolv.conf", want);
    }
    Ok(())
}

/// At start-up in a parent: configure the NIC with [`NetSetup::standard`], unplugged. Its
/// children then inherit a link that is up, addressed, routed and with its receive ring
/// filled, so a child given a network only needs the host to plug it in. Measured under TCG:
/// bringing the link up in each child cost about 60 ms of its start. No NIC: nothing to do.
pub fn prepare() {
    let Ok(name) = first_nic() else {
        return;
    };
    let net = NetSetup::standard();
    let done = inet_socket()
        .and_then(|sock| configure(&sock, &name, &net))
        .and_then(|()| write_resolver(&net));
    if let Err(e) = done {
        eprintln!("forkd-agent: cannot prepare {name}: {e}");
    }
}

/// Configure the first NIC as `net` says (unless the parent already did), and wait for its
/// carrier; returns its name.
pub fn apply(net: &NetSetup) -> Result<String, String> {
    let addr = parse(&net.addr, "address")?;
    let name = first_nic()?;
    let sock = inet_socket()?;
    if !configured_as(&sock, &name, addr) {
        configure(&sock, &name, net)?;
    }
    wait_for_carrier(&name);
    write_resolver(net)?;
    Ok(name)
}
