//! Saved state of a KVM guest: one vCPU's [`VcpuState`] as is (kind 1, what a one-vCPU
//! guest saves, readable by [`VcpuState::from_bytes`]), or every vCPU in one blob (kind 3:
//! a `u32` count, then each vCPU's kind-1 bytes, length-prefixed, in vCPU order).

use super::state::{self, Reader, Writer, KIND_KVM_SMP};
use super::x86::{VcpuState, MAX_VCPUS};
use super::GuestError;

/// Every vCPU's registers, in vCPU order.
pub(crate) fn to_bytes(vcpus: &[VcpuState]) -> Vec<u8> {
    if let [one] = vcpus {
        return one.to_bytes();
    }
    let mut w = Writer::new(KIND_KVM_SMP);
    w.u32(vcpus.len() as u32);
    for v in vcpus {
        w.blob(&v.to_bytes());
    }
    w.finish()
}

/// Parse [`to_bytes`] output of either kind.
pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Vec<VcpuState>, GuestError> {
    if state::kind_of(bytes)? != KIND_KVM_SMP {
        return Ok(vec![VcpuState::from_bytes(bytes)?]);
    }
    let mut r = Reader::new(bytes, KIND_KVM_SMP)?;
    let n = r.u32()? as usize;
    if n == 0 || n > MAX_VCPUS {
        return Err(GuestError::StateInvalid);
    }
    let out = (0..n)
        .map(|_| VcpuState::from_bytes(r.blob()?))
        .collect::<Result<Vec<_>, _>>()?;
    r.end()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_and_many_vcpus_round_trip() {
        let mut a = VcpuState::default();
        a.regs.r8 = 7;
        let mut b = a;
        b.regs.r8 = 9;
        assert_eq!(to_bytes(&[a]), a.to_bytes());
        assert_eq!(from_bytes(&to_bytes(&[a])).unwrap(), vec![a]);
        let many = to_bytes(&[a, b]);
        assert_eq!(from_bytes(&many).unwrap(), vec![a, b]);
        assert!(
            VcpuState::from_bytes(&many).is_err(),
            "kind 3 is not one vCPU"
        );
        assert!(from_bytes(&many[..many.len() - 1]).is_err());
        let mut extra = many.clone();
        extra.push(0);
        assert!(from_bytes(&extra).is_err());
    }
}
