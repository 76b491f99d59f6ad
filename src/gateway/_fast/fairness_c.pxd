# C types for fairness_c.py, a symlink to the pure-Python twin fairness_py.py:
# Cython compiles the twin's code under this name. Keep the declarations in
# step with the twin's signatures.

cimport cython

cdef int _NO_FLOW
cdef double _MIN_WEIGHT
cdef double _MAX_WEIGHT
cdef double _MIN_QUANTUM
cdef double _MAX_QUANTUM
cdef double _MAX_COST
cdef int _INITIAL_SLOTS

cdef void _check_weight(double weight) except *
cdef void _check_cost(double cost) except *


# final: no Python subclass can override a cpdef method, so calls skip that check.
@cython.final
cdef class DeficitRoundRobin:
    cdef double _quantum
    cdef int _capacity
    cdef int _open
    cdef int _free
    cdef int _head
    cdef int _active
    cdef bint _granted
    # Contiguous views of array.array buffers: the loops below index them
    # unchecked (boundscheck off), so every public method checks its slot.
    cdef double[::1] _weight
    cdef double[::1] _deficit
    cdef double[::1] _cost
    cdef int[::1] _queued
    cdef int[::1] _next
    cdef int[::1] _prev

    @cython.locals(old=int, i=int, weight="double[::1]", deficit="double[::1]", cost="double[::1]",
                   queued="int[::1]", next_="int[::1]", prev="int[::1]")
    cdef void _grow(self, int capacity) except *
    cdef void _check_slot(self, int slot) except *
    @cython.locals(slot=int)
    cpdef int open_flow(self, double weight) except -2
    cpdef void close_flow(self, int slot) except *
    cpdef void set_weight(self, int slot, double weight) except *
    cpdef double weight(self, int slot) except? -1.0
    cpdef double deficit(self, int slot) except? -1.0
    cpdef int queued(self, int slot) except? -1
    cpdef double head_cost(self, int slot) except? -1.0
    cpdef void push(self, int slot, double cost) except *
    cpdef void serve(self, int slot, double next_cost) except *
    cpdef void withdraw(self, int slot, double head_cost) except *
    # noexcept: integer and double arithmetic on checked state only.
    @cython.locals(slot=int, visits=int)
    cpdef int next_flow(self) noexcept
    @cython.locals(fewest=double, turns=double, fraction=double, skip=double, slot=int, _=int)
    cdef void _skip_turns(self) noexcept
    cdef void _pop(self, int slot, double head_cost) noexcept
    @cython.locals(tail=int)
    cdef void _activate(self, int slot) noexcept
    @cython.locals(following=int, previous=int)
    cdef void _deactivate(self, int slot) noexcept
