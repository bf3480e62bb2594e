/* Drives the vsock device (the second virtio-mmio slot, after virtio-rng) as Linux's
 * virtio_vsock driver would, without interrupts: negotiate, lay out the three queues, post one
 * RX buffer, connect to host port 5555, wait for the RESPONSE, send one line of data. Every
 * notification goes through KVM's ioeventfd to cvm's vhost-user backend, which writes the used
 * rings itself. Run with `cvm boot --vsock PATH` and a listener on PATH_5555. */
#include "common.S"

#define VSOCK   (VIRTIO_MMIO + 0x1000)
#define REG(off) (VSOCK + off)
#define QSIZE   16
#define RXQ     0x200000       /* each queue: descriptors, avail ring at +0x100, used at +0x200 */
#define TXQ     0x201000
#define EVQ     0x202000
#define RXBUF   0x210000
#define TXREQ   0x220000
#define TXRW    0x221000
#define WAIT    200000000      /* polls of a used ring before giving up */

.macro SETUP_QUEUE index, base
    movl $\index, REG(0x030)
    movl $QSIZE, REG(0x038)
    movl $\base, REG(0x080)
    movl $0, REG(0x084)
    movl $(\base + 0x100), REG(0x090)
    movl $0, REG(0x094)
    movl $(\base + 0x200), REG(0x0a0)
    movl $0, REG(0x0a4)
    movl $1, REG(0x044)
.endm

/* A vsock header at \at: guest CID 3 port 1000 to host CID 2 port 5555. */
.macro HEADER at, op, len
    movl $3, \at
    movl $0, \at + 4
    movl $2, \at + 8
    movl $0, \at + 12
    movl $1000, \at + 16
    movl $5555, \at + 20
    movl $\len, \at + 24
    movw $1, \at + 28          /* stream */
    movw $\op, \at + 30
    movl $0, \at + 32
    movl $4096, \at + 36       /* buf_alloc */
    movl $0, \at + 40          /* fwd_cnt */
.endm

/* wait until the 16-bit used index at \used reaches \value, or fail */
.macro WAIT_USED used, value
    movl $WAIT, %ecx
1:  cmpw $\value, \used
    je 2f
    pause
    loop 1b
    jmp timeout
2:
.endm

main:
    cmpl $19, REG(0x008)
    jne no_device
    movl $0, REG(0x070)
    movl $1, REG(0x070)            /* ACKNOWLEDGE */
    movl $3, REG(0x070)            /* DRIVER */
    movl $1, REG(0x024)            /* driver features, high word: VERSION_1 */
    movl $1, REG(0x020)
    movl $0, REG(0x024)
    movl $0, REG(0x020)
    movl $0xb, REG(0x070)          /* FEATURES_OK */
    SETUP_QUEUE 0, RXQ
    SETUP_QUEUE 1, TXQ
    SETUP_QUEUE 2, EVQ
    movl $0xf, REG(0x070)          /* DRIVER_OK: the backend gets the rings */
    testl $0x40, REG(0x070)        /* NEEDS_RESET */
    jnz refused_setup

    /* RX: one device-writable page. */
    movl $RXBUF, RXQ
    movl $0, RXQ + 4
    movl $4096, RXQ + 8
    movw $2, RXQ + 12              /* VRING_DESC_F_WRITE */
    movw $0, RXQ + 0x104
    movw $1, RXQ + 0x102
    movl $0, REG(0x050)            /* notify queue 0 */

    /* TX: REQUEST. */
    HEADER TXREQ, 1, 0
    movl $TXREQ, TXQ
    movl $0, TXQ + 4
    movl $44, TXQ + 8
    movw $0, TXQ + 12
    movw $0, TXQ + 0x104
    movw $1, TXQ + 0x102
    movl $1, REG(0x050)            /* notify queue 1 */

    WAIT_USED RXQ + 0x202, 1
    cmpw $2, RXBUF + 30            /* RESPONSE */
    jne refused

    /* TX: RW with the line, header and data in two descriptors. */
    HEADER TXRW, 5, (line_end - line)
    movl $TXRW, TXQ + 16
    movl $0, TXQ + 20
    movl $44, TXQ + 24
    movw $1, TXQ + 28              /* VRING_DESC_F_NEXT */
    movw $2, TXQ + 30
    movl $line, TXQ + 32
    movl $0, TXQ + 36
    movl $(line_end - line), TXQ + 40
    movw $0, TXQ + 44
    movw $1, TXQ + 0x106
    movw $2, TXQ + 0x102
    movl $1, REG(0x050)
    WAIT_USED TXQ + 0x202, 2

    PRINT "cvm micro-guest: vsock connected and sent\n"
    ret

no_device:
    PRINT "cvm micro-guest: no vsock device\n"
    ret
refused_setup:
    PRINT "cvm micro-guest: the device refused its set-up\n"
    ret
refused:
    PRINT "cvm micro-guest: the host refused the connection\n"
    ret
timeout:
    PRINT "cvm micro-guest: no answer from the vsock device\n"
    ret

    .section .rodata
line:
    .ascii "hello from the micro-guest\n"
line_end:
