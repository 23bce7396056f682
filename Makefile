# Install callcap as a systemd service (as root):
#
#   make install              virtualenv in /opt/callcap, `callcap` on PATH, the unit, its
#                             sysusers.d/tmpfiles.d files, /etc/callcap/callcap.yaml if absent;
#                             then creates the user and directories and reloads systemd
#   systemctl enable --now callcap
#   make uninstall            removes what install added; keeps recordings and the config
#   make uninstall PURGE=yes  ... and removes /etc/callcap and /var/lib/callcap too
#
# DESTDIR stages the files under another root (for packaging, or to look before installing);
# nothing is activated then (no sysusers, tmpfiles or daemon-reload).  The virtualenv's
# scripts name their interpreter by its final path, so a staged tree runs once it is in place.

PYTHON      ?= python3
PREFIX      ?= /usr/local
BINDIR      ?= $(PREFIX)/bin
VENV        ?= /opt/callcap
SYSCONFDIR  ?= /etc
STATEDIR    ?= /var/lib/callcap
UNITDIR     ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
PURGE       ?= no
DESTDIR     ?=

CONFDIR := $(SYSCONFDIR)/callcap

.PHONY: install install-venv install-files activate uninstall

install: install-venv install-files activate

install-venv:
	$(PYTHON) -m venv $(DESTDIR)$(VENV)
	$(DESTDIR)$(VENV)/bin/python -m pip install --quiet --upgrade .

install-files:
	install -d -m 0755 $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) \
		$(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(TMPFILESDIR)
	ln -sfn $(VENV)/bin/callcap $(DESTDIR)$(BINDIR)/callcap
	sed -e 's|/usr/local/bin/callcap|$(BINDIR)/callcap|' \
		-e 's|/etc/callcap/callcap.yaml|$(CONFDIR)/callcap.yaml|' \
		systemd/callcap.service > $(DESTDIR)$(UNITDIR)/callcap.service.tmp
	chmod 0644 $(DESTDIR)$(UNITDIR)/callcap.service.tmp
	mv -f $(DESTDIR)$(UNITDIR)/callcap.service.tmp $(DESTDIR)$(UNITDIR)/callcap.service
	install -m 0644 systemd/callcap.sysusers $(DESTDIR)$(SYSUSERSDIR)/callcap.conf
	install -m 0644 systemd/callcap.tmpfiles $(DESTDIR)$(TMPFILESDIR)/callcap.conf
	install -d -m 0750 $(DESTDIR)$(CONFDIR)
	@# an admin's config is never overwritten
	test -e $(DESTDIR)$(CONFDIR)/callcap.yaml || \
		install -m 0640 config/default.yaml $(DESTDIR)$(CONFDIR)/callcap.yaml

activate:
ifeq ($(DESTDIR),)
	systemd-sysusers $(SYSUSERSDIR)/callcap.conf
	systemd-tmpfiles --create $(TMPFILESDIR)/callcap.conf
	chgrp callcap $(CONFDIR) $(CONFDIR)/callcap.yaml
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "callcap installed: edit $(CONFDIR)/callcap.yaml, then: systemctl enable --now callcap"
else
	@echo "staged under $(DESTDIR): not activated"
endif

uninstall:
ifeq ($(DESTDIR),)
	-if [ -d /run/systemd/system ]; then systemctl disable --now callcap.service; fi
endif
	rm -f $(DESTDIR)$(UNITDIR)/callcap.service $(DESTDIR)$(SYSUSERSDIR)/callcap.conf \
		$(DESTDIR)$(TMPFILESDIR)/callcap.conf
	if [ -L $(DESTDIR)$(BINDIR)/callcap ]; then rm -f $(DESTDIR)$(BINDIR)/callcap; fi
	@# only ever a directory that is a callcap virtualenv
	if [ -f $(DESTDIR)$(VENV)/pyvenv.cfg ] && [ -x $(DESTDIR)$(VENV)/bin/callcap ]; then \
		rm -rf $(DESTDIR)$(VENV); fi
ifeq ($(PURGE),yes)
	rm -rf $(DESTDIR)$(CONFDIR) $(DESTDIR)$(STATEDIR)
endif
ifeq ($(DESTDIR),)
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
endif
	@echo "callcap removed$(if $(filter yes,$(PURGE)),, (kept $(CONFDIR) and $(STATEDIR)))"
