//! The virtio-blk device model: feature bits and the config space the guest reads.
//!
//! Pure data: nothing here touches the image or the guest's memory.

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Sector size of the virtio-blk protocol (offsets and capacity are in these units).
pub const SECTOR_SIZE: u64 = 512;
/// Length of the ID string returned by `VIRTIO_BLK_T_GET_ID`.
pub const ID_BYTES: usize = 20;
/// Segments a DISCARD or WRITE_ZEROES request may carry.
pub const MAX_DISCARD_SEG: u32 = 1;
/// Largest DISCARD / WRITE_ZEROES segment, in sectors (2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 0x40_0000;
/// Largest data segment (descriptor) of a request (virtio-blk SIZE_MAX).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most data segments of a request (virtio-blk SEG_MAX), whatever the queue size.
pub const MAX_SEG_MAX: u32 = 1022;

/// Bit 30 of the virtio features: vhost-user protocol features are supported.
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// What the device offers, derived from how it is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceModel {
    pub capacity_sectors: u64,
    pub num_queues: u16,
    pub queue_size: u16,
    pub readonly: bool,
}

impl DeviceModel {
    /// Virtio feature bits offered to the driver.
    pub fn features(&self) -> u64 {
        let mut bits = [
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_MQ,
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VHOST_USER_F_PROTOCOL_FEATURES,
        ]
        .iter()
        .fold(0u64, |acc, b| acc | (1u64 << b));
        if self.readonly {
            bits |= 1 << VIRTIO_BLK_F_RO;
        } else {
            bits |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        bits
    }

    /// Most data segments in one request: two descriptors go to header and status.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size)
            .saturating_sub(2)
            .clamp(1, MAX_SEG_MAX)
    }

    /// Most data bytes in one request: SEG_MAX segments of SIZE_MAX (a guest that follows the
    /// config space never sends more; a larger request is refused).
    pub fn max_request_bytes(&self) -> u64 {
        u64::from(self.seg_max()) * u64::from(SIZE_MAX)
    }

    /// The config space (`struct virtio_blk_config`) as the guest sees it, little endian.
    pub fn config_space(&self, writeback: bool) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(off::CAPACITY, &self.capacity_sectors.to_le_bytes());
        put(off::SEG_MAX, &self.seg_max().to_le_bytes());
        put(off::SIZE_MAX, &SIZE_MAX.to_le_bytes());
        put(off::BLK_SIZE, &(SECTOR_SIZE as u32).to_le_bytes());
        // 4 KiB physical blocks: guests align their I/O to 4 KiB, which suits page-cache I/O.
        put(off::PHYSICAL_BLOCK_EXP, &[3]);
        put(off::MIN_IO_SIZE, &1u16.to_le_bytes());
        put(off::WCE, &[u8::from(writeback)]);
        put(off::NUM_QUEUES, &self.num_queues.to_le_bytes());
        if !self.readonly {
            put(off::MAX_DISCARD_SECTORS, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(off::MAX_DISCARD_SEG, &MAX_DISCARD_SEG.to_le_bytes());
            put(off::DISCARD_SECTOR_ALIGNMENT, &1u32.to_le_bytes());
            put(
                off::MAX_WRITE_ZEROES_SECTORS,
                &MAX_DISCARD_SECTORS.to_le_bytes(),
            );
            put(off::MAX_WRITE_ZEROES_SEG, &MAX_DISCARD_SEG.to_le_bytes());
            put(off::WRITE_ZEROES_MAY_UNMAP, &[1]);
        }
        c
    }
}

/// Size of the config space we implement (up to and including `unused1`).
pub const CONFIG_LEN: usize = 60;

/// Byte offsets of `struct virtio_blk_config` fields (virtio 1.2, 5.2.4).
pub mod off {
    use std::mem::offset_of;
    use virtio_bindings::virtio_blk::virtio_blk_config as C;
    pub const CAPACITY: usize = offset_of!(C, capacity);
    pub const SEG_MAX: usize = offset_of!(C, seg_max);
    pub const SIZE_MAX: usize = offset_of!(C, size_max);
    pub const BLK_SIZE: usize = offset_of!(C, blk_size);
    pub const PHYSICAL_BLOCK_EXP: usize = offset_of!(C, physical_block_exp);
    pub const MIN_IO_SIZE: usize = offset_of!(C, min_io_size);
    pub const WCE: usize = offset_of!(C, wce);
    pub const NUM_QUEUES: usize = offset_of!(C, num_queues);
    pub const MAX_DISCARD_SECTORS: usize = offset_of!(C, max_discard_sectors);
    pub const MAX_DISCARD_SEG: usize = offset_of!(C, max_discard_seg);
    pub const DISCARD_SECTOR_ALIGNMENT: usize = offset_of!(C, discard_sector_alignment);
    pub const MAX_WRITE_ZEROES_SECTORS: usize = offset_of!(C, max_write_zeroes_sectors);
    pub const MAX_WRITE_ZEROES_SEG: usize = offset_of!(C, max_write_zeroes_seg);
    pub const WRITE_ZEROES_MAY_UNMAP: usize = offset_of!(C, write_zeroes_may_unmap);
}

/// Answers a GET_CONFIG for `size` bytes at `offset`: exactly `size` bytes, zero beyond our
/// config space (vhost-user requires the reply to match the request's size).
pub fn read_config(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let start = (offset as usize).min(config.len());
    let end = (offset as usize)
        .saturating_add(size as usize)
        .min(config.len());
    out[..end - start].copy_from_slice(&config[start..end]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(readonly: bool) -> DeviceModel {
        DeviceModel {
            capacity_sectors: 2048,
            num_queues: 2,
            queue_size: 256,
            readonly,
        }
    }

    #[test]
    fn layout_matches_the_spec() {
        assert_eq!(off::CAPACITY, 0);
        assert_eq!(off::SEG_MAX, 12);
        assert_eq!(off::BLK_SIZE, 20);
        assert_eq!(off::WCE, 32);
        assert_eq!(off::NUM_QUEUES, 34);
        assert_eq!(off::MAX_DISCARD_SECTORS, 36);
        assert_eq!(off::WRITE_ZEROES_MAY_UNMAP, 56);
    }

    #[test]
    fn config_space_fields() {
        let c = model(false).config_space(true);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap_or_default()),
            2048
        );
        assert_eq!(
            u32::from_le_bytes(c[12..16].try_into().unwrap_or_default()),
            254
        );
        assert_eq!(
            u32::from_le_bytes(c[20..24].try_into().unwrap_or_default()),
            512
        );
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 2);
        assert_eq!(
            u32::from_le_bytes(c[40..44].try_into().unwrap_or_default()),
            1
        );
        assert_eq!(model(false).config_space(false)[32], 0);
    }

    #[test]
    fn readonly_offers_ro_and_no_discard() {
        let f = model(true).features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        let f = model(false).features();
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(f & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
        assert_ne!(f & (1 << VIRTIO_BLK_F_MQ), 0);
    }

    #[test]
    fn read_config_pads_and_clips() {
        let c = model(false).config_space(true);
        let r = read_config(&c, 0, 8);
        assert_eq!(r, c[0..8].to_vec());
        let r = read_config(&c, 56, 16);
        assert_eq!(r.len(), 16);
        assert_eq!(r[0], 1);
        assert!(r[4..].iter().all(|b| *b == 0));
        assert_eq!(read_config(&c, 1000, 4), vec![0; 4]);
        assert_eq!(read_config(&c, u32::MAX, 4), vec![0; 4]);
    }
}
