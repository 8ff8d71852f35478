package main

// extents: a sorted set of disjoint byte ranges [off, end), merged where they
// touch. Deltas use one to know which bytes they hold; change tracking uses
// one per epoch to know which bytes a guest wrote.

import "sort"

type span struct{ off, end int64 }

type extents []span

// add inserts [off, end), merging with the ranges it overlaps or touches.
func (e *extents) add(off, end int64) {
	if end <= off {
		return
	}
	s := *e
	i := sort.Search(len(s), func(i int) bool { return s[i].end >= off })
	j := i
	for j < len(s) && s[j].off <= end {
		if s[j].off < off {
			off = s[j].off
		}
		if s[j].end > end {
			end = s[j].end
		}
		j++
	}
	out := make(extents, 0, len(s)-(j-i)+1)
	out = append(out, s[:i]...)
	out = append(out, span{off, end})
	out = append(out, s[j:]...)
	*e = out
}

// union adds every range of o.
func (e *extents) union(o extents) {
	for _, x := range o {
		e.add(x.off, x.end)
	}
}

// within returns the parts of the set inside [off, end).
func (e extents) within(off, end int64) extents {
	var out extents
	i := sort.Search(len(e), func(i int) bool { return e[i].end > off })
	for ; i < len(e) && e[i].off < end; i++ {
		a, b := e[i].off, e[i].end
		if a < off {
			a = off
		}
		if b > end {
			b = end
		}
		out = append(out, span{a, b})
	}
	return out
}

func (e extents) bytes() int64 {
	var n int64
	for _, x := range e {
		n += x.end - x.off
	}
	return n
}
