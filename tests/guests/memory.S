/* Prints the PVH memory map (address, size, type per entry, as hi:lo hex) and writes then
 * reads back the last word of every RAM range below 4 GiB. */
#include "common.S"

main:
    movl 0x28(%ebp), %esi          /* memmap_paddr (low half) */
    movl 0x30(%ebp), %ecx          /* memmap_entries */
    PRINT "entries "
    movl %ecx, %eax
    call put_hex
    PRINT "\n"
1:  testl %ecx, %ecx
    jz 3f
    PRINT "ram "
    movl 4(%esi), %eax
    call put_hex
    PRINT ":"
    movl 0(%esi), %eax
    call put_hex
    PRINT " "
    movl 12(%esi), %eax
    call put_hex
    PRINT ":"
    movl 8(%esi), %eax
    call put_hex
    PRINT " type "
    movl 16(%esi), %eax
    call put_hex
    PRINT "\n"
    cmpl $1, 16(%esi)              /* RAM? */
    jne 2f
    cmpl $0, 4(%esi)               /* starts below 4 GiB? */
    jne 2f
    movl 0(%esi), %edi
    addl 8(%esi), %edi             /* end (wraps to 0 at 4 GiB: skip such ranges) */
    jc 2f
    subl $4, %edi
    movl $0x5aa5c33c, (%edi)
    cmpl $0x5aa5c33c, (%edi)
    jne 4f
2:  addl $24, %esi
    decl %ecx
    jmp 1b
3:  PRINT "memory ok\n"
    ret
4:  PRINT "memory MISMATCH\n"
    ret
