/* Halts with interrupts disabled, as Linux's halt and poweroff do without ACPI: nothing can
 * wake the CPU, and the VMM must notice and end the VM. */
#include "common.S"

main:
    PRINT "halting with interrupts off\n"
    cli
1:  hlt
    jmp 1b
