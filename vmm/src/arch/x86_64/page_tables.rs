//! Reading a 64-bit guest's own page tables (4-level paging, as Linux without LA57 sets them
//! up), to find what backs a range of its virtual memory.

/// Where Linux puts its struct pages (VMEMMAP) and its direct map of all RAM with 4-level
/// paging, unless it randomizes its memory layout.
pub const LINUX_VMEMMAP_START: u64 = 0xffff_ea00_0000_0000;
pub const LINUX_DIRECT_MAP_START: u64 = 0xffff_8880_0000_0000;
/// CR4's bit for 5-level paging, where both lie elsewhere.
pub const CR4_LA57: u64 = 1 << 12;

const PRESENT: u64 = 1;
/// A page-directory (2 MiB) or page-directory-pointer (1 GiB) entry that maps a page itself.
const LARGE: u64 = 1 << 7;
const ADDRESS: u64 = 0x000f_ffff_ffff_f000;
/// The address bits each level translates, top down.
const LEVEL_SHIFTS: [u32; 4] = [39, 30, 21, 12];

/// Translates `virt` through the tables at `cr3`, reading each entry with `read` (a guest
/// physical address to the u64 there, None outside RAM). Returns the mapping's size and the
/// guest-physical start of the page holding `virt`, or None with the size of the unmapped
/// block it lies in.
fn translate(read: &impl Fn(u64) -> Option<u64>, cr3: u64, virt: u64) -> (Option<u64>, u64) {
    let mut table = cr3 & ADDRESS;
    for (depth, shift) in LEVEL_SHIFTS.into_iter().enumerate() {
        let size = 1u64 << shift;
        let entry = match read(table + ((virt >> shift) & 511) * 8) {
            Some(entry) if entry & PRESENT != 0 => entry,
            _ => return (None, size),
        };
        let leaf = shift == 12 || (depth > 0 && entry & LARGE != 0);
        if leaf {
            return (Some(entry & ADDRESS & !(size - 1)), size);
        }
        table = entry & ADDRESS;
    }
    unreachable!("the last level is a leaf")
}

/// The guest-physical page of virtual address `virt`, if mapped.
pub fn physical(read: impl Fn(u64) -> Option<u64>, cr3: u64, virt: u64) -> Option<u64> {
    let (page, size) = translate(&read, cr3, virt);
    page.map(|page| page + (virt & (size - 1)))
}

/// The guest-physical (start, end) runs that back virtual `start..end` in the tables at
/// `cr3`, in virtual order, adjacent ones merged; what is unmapped is left out. At most
/// `max_runs` runs: the walk stops there.
pub fn backing(read: impl Fn(u64) -> Option<u64>, cr3: u64, start: u64, end: u64, max_runs: usize) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut virt = start;
    while virt < end {
        let (page, size) = translate(&read, cr3, virt);
        let page_start = virt & !(size - 1);
        let next = page_start.saturating_add(size).min(end);
        if let Some(page) = page {
            let (from, to) = (page + (virt - page_start), page + (next - page_start));
            if let Some(last) = runs.last_mut().filter(|last| last.1 == from) {
                last.1 = to;
            } else if runs.len() < max_runs {
                runs.push((from, to));
            } else {
                break;
            }
        }
        if next == virt {
            break;
        }
        virt = next;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Page tables being built in a sparse guest memory.
    #[derive(Default)]
    struct Tables {
        words: HashMap<u64, u64>,
        next_table: u64,
    }

    impl Tables {
        const CR3: u64 = 0x10_0000;

        fn new() -> Tables {
            Tables { words: HashMap::new(), next_table: Tables::CR3 + 0x1000 }
        }

        /// Maps `virt` to `phys` with a page of `size` (4 KiB, 2 MiB or 1 GiB).
        fn map(&mut self, virt: u64, phys: u64, size: u64) {
            let mut table = Tables::CR3;
            for shift in LEVEL_SHIFTS {
                let slot = table + ((virt >> shift) & 511) * 8;
                if 1u64 << shift == size {
                    self.words.insert(slot, phys | PRESENT | if size > 4096 { LARGE } else { 0 });
                    return;
                }
                table = match self.words.get(&slot) {
                    Some(entry) => entry & ADDRESS,
                    None => {
                        let new = self.next_table;
                        self.next_table += 0x1000;
                        self.words.insert(slot, new | PRESENT);
                        new
                    }
                };
            }
        }

        fn reader(&self) -> impl Fn(u64) -> Option<u64> + '_ {
            // Tables live below 2 MiB: anything else read as a table is outside "RAM".
            |at| if at < 2 << 20 { Some(self.words.get(&at).copied().unwrap_or(0)) } else { None }
        }
    }

    #[test]
    fn pages_of_every_size_translate_and_merge_into_runs() {
        let mut t = Tables::new();
        let base = LINUX_VMEMMAP_START;
        t.map(base, 0x1f40_0000, 2 << 20);
        t.map(base + (2 << 20), 0x1f60_0000, 2 << 20);
        t.map(base + (4 << 20) + 0x1000, 0x5000, 4096);
        t.map(1 << 30, 3 << 30, 1 << 30);
        let read = t.reader();
        assert_eq!(physical(&read, Tables::CR3, base + 0x123), Some(0x1f40_0123));
        assert_eq!(physical(&read, Tables::CR3, (1 << 30) + 77), Some((3 << 30) + 77));
        assert_eq!(physical(&read, Tables::CR3, base + (4 << 20)), None);
        assert_eq!(
            backing(&read, Tables::CR3, base, base + (8 << 20), 16),
            [(0x1f40_0000, 0x1f80_0000), (0x5000, 0x6000)],
            "two 2 MiB pages side by side are one run; the hole is left out"
        );
        assert_eq!(backing(&read, Tables::CR3, base + 0x1000, base + 0x3000, 16), [(0x1f40_1000, 0x1f40_3000)], "a range inside a page");
        assert_eq!(backing(&read, Tables::CR3, base, base + (8 << 20), 1), [(0x1f40_0000, 0x1f80_0000)], "capped");
        assert_eq!(backing(&read, Tables::CR3, 0, 1 << 40, 16), [(3 << 30, 4 << 30)], "unmapped blocks are skipped whole");
    }

    proptest::proptest! {
        /// Whatever the guest left in its page tables, the walk ends and never panics.
        #[test]
        fn any_tables_are_walked_safely(words in proptest::collection::vec(proptest::prelude::any::<u64>(), 512 * 4), cr3 in 0u64..0x4000, start in proptest::prelude::any::<u64>()) {
            let read = |at: u64| words.get(usize::try_from(at / 8).ok()?).copied();
            let runs = backing(read, cr3, start, start.saturating_add(1 << 24), 64);
            proptest::prop_assert!(runs.len() <= 64 && runs.iter().all(|(s, e)| s < e));
        }
    }
}
