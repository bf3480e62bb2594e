/* Exercises MMIO exits: a write and a read where nothing is mapped (the VMM must carry on and
 * read all ones), then the virtio-mmio registers of the first device (virtio-rng) as Linux's
 * virtio_mmio driver probes and negotiates them, and a device reset. */
#include "common.S"

#define REG(off) (VIRTIO_MMIO + off)

main:
    movl $0x12345678, 0xe0000000
    PRINT "unmapped read "
    movl 0xe0000000, %eax
    call put_hex
    PRINT "\nvirtio magic "
    movl REG(0x000), %eax
    call put_hex
    PRINT " version "
    movl REG(0x004), %eax
    call put_hex
    PRINT " device "
    movl REG(0x008), %eax
    call put_hex
    PRINT "\n"

    movl $0, REG(0x070)            /* reset */
    movl $1, REG(0x070)            /* ACKNOWLEDGE */
    movl $3, REG(0x070)            /* + DRIVER */
    movl $1, REG(0x014)            /* device features, high word */
    PRINT "features high "
    movl REG(0x010), %eax
    call put_hex
    PRINT "\n"
    movl $1, REG(0x024)            /* driver features, high word: VERSION_1 */
    movl $1, REG(0x020)
    movl $0, REG(0x024)
    movl $0, REG(0x020)
    movl $0xb, REG(0x070)          /* + FEATURES_OK */
    PRINT "status "
    movl REG(0x070), %eax
    call put_hex
    movl $0, REG(0x030)            /* queue 0 */
    PRINT " queue max "
    movl REG(0x034), %eax
    call put_hex
    movl $1, REG(0x030)            /* queue 1 does not exist */
    PRINT " queue1 max "
    movl REG(0x034), %eax
    call put_hex
    movl $0, REG(0x070)            /* reset */
    PRINT " after reset "
    movl REG(0x070), %eax
    call put_hex
    PRINT "\n"
    ret
