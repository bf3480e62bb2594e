/* Prints a dot, spins a while, and again, forever: a guest that is always running, for the
 * tests of pausing and resuming the VM's vCPUs (its output stops while paused). */
#include "common.S"

main:
    movw $SERIAL, %dx
1:  movb $'.', %al
    outb %al, %dx
    movl $200000, %ecx
2:  decl %ecx
    jnz 2b
    jmp 1b
