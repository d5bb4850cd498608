################################################################################
#
# edgepack-model: an edgepack bundle's model and native/ runtime, from its packed archive
#
# In CI: edgepack build ... --sign KEY; edgepack inspect --trusted-key KEY.pub BUNDLE; edgepack pack BUNDLE.
# Pin the archive in edgepack-model.hash (Buildroot checks it); each file is then checked against edgepack.json.
#
################################################################################

EDGEPACK_MODEL_BUNDLE = $(call qstrip,$(BR2_PACKAGE_EDGEPACK_MODEL_BUNDLE))
EDGEPACK_MODEL_VERSION = 1
EDGEPACK_MODEL_SOURCE = $(EDGEPACK_MODEL_BUNDLE).tar.gz
EDGEPACK_MODEL_SITE = $(call qstrip,$(BR2_PACKAGE_EDGEPACK_MODEL_SITE))
EDGEPACK_MODEL_SITE_METHOD = file
EDGEPACK_MODEL_LICENSE = see edgepack.json and sbom.cdx.json in the bundle
EDGEPACK_MODEL_INSTALL_STAGING = YES
EDGEPACK_MODEL_DIR = /opt/edgepack/$(EDGEPACK_MODEL_BUNDLE)

define EDGEPACK_MODEL_VERIFY_FILES
	cd $(@D) && python3 -c 'import hashlib, json, sys; m = json.load(open("edgepack.json")); \
	bad = [f["path"] for f in m["files"] if hashlib.sha256(open(f["path"], "rb").read()).hexdigest() != f["sha256"]]; \
	sys.exit("edgepack-model: files differ from edgepack.json: %s" % bad if bad else \
	(None if (m.get("native") or {}).get("program") else "edgepack-model: the bundle has no compiled native/edgepack-chat"))'
endef
EDGEPACK_MODEL_POST_EXTRACT_HOOKS += EDGEPACK_MODEL_VERIFY_FILES

define EDGEPACK_MODEL_INSTALL_TARGET_CMDS
	$(INSTALL) -d $(TARGET_DIR)$(EDGEPACK_MODEL_DIR)/native $(TARGET_DIR)$(EDGEPACK_MODEL_DIR)/model
	$(INSTALL) -m 0644 $(@D)/edgepack.json $(TARGET_DIR)$(EDGEPACK_MODEL_DIR)/edgepack.json
	$(INSTALL) -m 0755 $(@D)/native/edgepack-chat $(@D)/native/libonnxruntime-genai.so \
		$(@D)/native/libonnxruntime.so.1 $(TARGET_DIR)$(EDGEPACK_MODEL_DIR)/native/
	cp -R $(@D)/model/. $(TARGET_DIR)$(EDGEPACK_MODEL_DIR)/model/
endef

# for the image's own programs: link with `pkg-config --libs edgepack-runtime` against the staging copy
define EDGEPACK_MODEL_INSTALL_STAGING_CMDS
	$(INSTALL) -D -m 0644 $(@D)/native/edgepack_oga.h $(STAGING_DIR)/usr/include/edgepack_oga.h
	$(INSTALL) -d $(STAGING_DIR)$(EDGEPACK_MODEL_DIR)/native $(STAGING_DIR)/usr/lib/pkgconfig
	$(INSTALL) -m 0755 $(@D)/native/libonnxruntime-genai.so $(@D)/native/libonnxruntime.so.1 \
		$(STAGING_DIR)$(EDGEPACK_MODEL_DIR)/native/
	sed -e 's|^prefix=.*|prefix=$(EDGEPACK_MODEL_DIR)/native|' -e 's|^includedir=.*|includedir=/usr/include|' \
		$(@D)/native/edgepack-runtime.pc > $(STAGING_DIR)/usr/lib/pkgconfig/edgepack-runtime.pc
endef

$(eval $(generic-package))
