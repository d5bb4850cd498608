# A Makefile fragment for a firmware repository: `include edgepack.mk`, then `make model-bundle` puts a signed,
# packed, verified bundle where the image build picks it up, and `make model-deploy BOARD=pi.local` puts it on a
# board. Rebuilds with nothing changed take about a second (edgepack's build cache).
# tests/integration/test_ci_recipes.py runs both targets against a real sshd.
EDGEPACK        ?= edgepack
EDGEPACK_MODEL  ?= smollm2-135m
EDGEPACK_TARGET ?= rpi5
EDGEPACK_KEY    ?= keys/release.key
EDGEPACK_PUB    ?= keys/release.pub
EDGEPACK_OUT    ?= build/edgepack
# Reproducible archive: entries dated by the last commit.
export SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)
EDGEPACK_NAME    = $(notdir $(EDGEPACK_MODEL))-$(basename $(notdir $(EDGEPACK_TARGET)))
EDGEPACK_ARCHIVE = $(EDGEPACK_OUT)/$(EDGEPACK_NAME).tar.gz

.PHONY: model-bundle model-deploy

model-bundle:
	mkdir -p $(EDGEPACK_OUT)
	$(EDGEPACK) --json build --target $(EDGEPACK_TARGET) $(EDGEPACK_MODEL) --out $(EDGEPACK_OUT)/dist --force \
	  --sign $(EDGEPACK_KEY) > $(EDGEPACK_OUT)/build.json
	$(EDGEPACK) --json pack $(EDGEPACK_OUT)/dist/$(EDGEPACK_NAME) --out $(EDGEPACK_ARCHIVE) > $(EDGEPACK_OUT)/pack.json
	$(EDGEPACK) inspect $(EDGEPACK_ARCHIVE)

model-deploy: model-bundle
	$(EDGEPACK) --json deploy $(EDGEPACK_ARCHIVE) --host $(BOARD) --require-signature $(EDGEPACK_PUB) \
	  $(if $(BOARD_PORT),--port $(BOARD_PORT)) $(if $(BOARD_USER),--user $(BOARD_USER)) \
	  $(if $(BOARD_IDENTITY),--identity $(BOARD_IDENTITY)) $(if $(KNOWN_HOSTS),--known-hosts $(KNOWN_HOSTS)) \
	  $(if $(INSTALL_DIR),--install-dir $(INSTALL_DIR)) > $(EDGEPACK_OUT)/deploy.json
