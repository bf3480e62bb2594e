/* Shared by cvm's micro-guests: the PVH entry note, a stack, serial output, and the exit.
 * Each guest defines `main`; returning from it resets the machine.
 * Built by build.rs: cc -c, then ld at 1 MiB, into a 64-bit ELF whose PVH note points at
 * 32-bit protected-mode code, as Linux's vmlinux does. */

#define SERIAL      0x3f8
#define BOOT_TIMER  0xc0000000
#define VIRTIO_MMIO 0xc0001000

    .code32

    /* XEN_ELFNOTE_PHYS32_ENTRY (18): the 32-bit entry point of the PVH boot protocol. */
    .section .note.pvh, "a", @note
    .balign 4
    .long 4, 4, 18
    .asciz "Xen"
    .balign 4
    .long _start

    .text
    .globl _start
_start:
    movl $0x80000, %esp
    movl %ebx, %ebp            /* PVH start info, for guests that read it */
    call main
    jmp reset

/* print a string literal */
.macro PRINT text
    .section .rodata
.Lstr\@: .asciz "\text"
    .text
    pushl %esi
    movl $.Lstr\@, %esi
    call puts
    popl %esi
.endm

/* puts: write the NUL-terminated string at %esi to the serial port */
puts:
    pushl %eax
    pushl %edx
    movw $SERIAL, %dx
1:  lodsb
    testb %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  popl %edx
    popl %eax
    ret

/* put_hex: write %eax as eight hex digits */
put_hex:
    pushal
    movl %eax, %ebx
    movl $8, %ecx
    movw $SERIAL, %dx
1:  roll $4, %ebx
    movl %ebx, %eax
    andl $0xf, %eax
    addb $'0', %al
    cmpb $'9', %al
    jbe 2f
    addb $('a' - '9' - 1), %al
2:  outb %al, %dx
    loop 1b
    popal
    ret

/* reset: the i8042 reset line ends a cvm VM; QEMU's isa-debug-exit (port 0xf4) ends a QEMU
 * one, where nothing listens on 0x64. */
reset:
    movb $0xfe, %al
    outb %al, $0x64
    xorl %eax, %eax
    outb %al, $0xf4
    cli
1:  hlt
    jmp 1b
