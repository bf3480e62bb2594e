//! The guest's network interfaces: loopback, always up (the relays listen there), and with
//! `--network open` the virtio-net interface, addressed statically as the host's userspace
//! network stack (passt) expects, so no DHCP client is needed.

use std::io;
use std::net::Ipv4Addr;

/// The virtio-net interface: the guest's only Ethernet device.
const ETHERNET: &str = "eth0";

/// Brings the loopback interface up (the kernel starts with it down).
pub fn bring_up_loopback() -> io::Result<()> {
    Control::open()?.up("lo")
}

/// Gives the Ethernet interface its address and MTU, brings it up, routes everything through
/// `gateway`, and makes `nameserver` the resolver.
pub fn configure_ethernet(address: Ipv4Addr, prefix_len: u8, gateway: Ipv4Addr, nameserver: Ipv4Addr, mtu: u16) -> io::Result<()> {
    if prefix_len > 32 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad prefix length {prefix_len}")));
    }
    let netmask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix_len)).unwrap_or(0));
    let control = Control::open()?;
    control.set_address(ETHERNET, libc::SIOCSIFADDR, address)?;
    control.set_address(ETHERNET, libc::SIOCSIFNETMASK, netmask)?;
    control.set_mtu(ETHERNET, mtu)?;
    control.up(ETHERNET)?;
    control.add_default_route(gateway)?;
    // A symlink (to systemd-resolved's file, say) is replaced, not followed.
    let _ = std::fs::remove_file("/etc/resolv.conf");
    std::fs::create_dir_all("/etc")?;
    std::fs::write("/etc/resolv.conf", format!("nameserver {nameserver}\n"))
}

/// A datagram socket used only for interface ioctls.
struct Control(std::os::fd::OwnedFd);

impl Control {
    fn open() -> io::Result<Control> {
        // SAFETY: socket() takes plain integers and returns a new fd or -1.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh socket that nothing else owns.
        Ok(Control(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }

    /// An ifreq naming `interface`.
    fn request(interface: &str) -> libc::ifreq {
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(interface.bytes().take(libc::IFNAMSIZ - 1)) {
            *dst = src as libc::c_char;
        }
        req
    }

    fn ioctl<T>(&self, request: libc::Ioctl, arg: &mut T, what: &str) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: `arg` is the structure this request reads or writes, and outlives the call.
        if unsafe { libc::ioctl(self.0.as_raw_fd(), request, arg as *mut T) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
        }
        Ok(())
    }

    fn up(&self, interface: &str) -> io::Result<()> {
        let mut req = Self::request(interface);
        self.ioctl(libc::SIOCGIFFLAGS, &mut req, &format!("cannot read {interface}'s flags"))?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        self.ioctl(libc::SIOCSIFFLAGS, &mut req, &format!("cannot bring {interface} up"))
    }

    fn set_address(&self, interface: &str, request: libc::Ioctl, address: Ipv4Addr) -> io::Result<()> {
        let mut req = Self::request(interface);
        req.ifr_ifru.ifru_addr = sockaddr(address);
        self.ioctl(request, &mut req, &format!("cannot set {interface}'s address {address}"))
    }

    fn set_mtu(&self, interface: &str, mtu: u16) -> io::Result<()> {
        let mut req = Self::request(interface);
        req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        self.ioctl(libc::SIOCSIFMTU, &mut req, &format!("cannot set {interface}'s MTU to {mtu}"))
    }

    fn add_default_route(&self, gateway: Ipv4Addr) -> io::Result<()> {
        // SAFETY: rtentry is plain old data; all zeroes is a valid value.
        let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
        route.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        route.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        route.rt_gateway = sockaddr(gateway);
        route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        self.ioctl(libc::SIOCADDRT, &mut route, &format!("cannot route through {gateway}"))
    }
}

/// An IPv4 address as the generic sockaddr that interface ioctls take.
fn sockaddr(address: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(address).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes, and the kernel reads an AF_INET
    // sockaddr as a sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}
