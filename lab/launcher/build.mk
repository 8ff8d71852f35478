# Builds the lab's vCenter simulator launcher (one process per site).
# Included by the top-level Makefile; also usable on its own, from the
# repository root:  make -f lab/launcher/build.mk build/vcsim-lab
#
# Needs Debian's golang-go and golang-github-vmware-govmomi-dev (GOPATH mode,
# no network).

LAB_GOPATH ?= /usr/share/gocode
LAB_LAUNCHER_SRC := $(wildcard lab/launcher/*.go)

build/vcsim-lab: $(LAB_LAUNCHER_SRC)
	@mkdir -p build
	cd lab/launcher && GO111MODULE=off GOPATH=$(LAB_GOPATH) go build -o ../../build/vcsim-lab .
