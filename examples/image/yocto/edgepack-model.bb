# An edgepack bundle in a Yocto image, with no Python on the device: the model and native/ (onnxruntime-genai's
# libraries and edgepack-chat, compiled by edgepack for the target) from the bundle's packed archive.
#
#   1. In CI: edgepack build --target rpi5 smollm2-135m --sign release.key, then
#      edgepack inspect --trusted-key release.key.pub dist/smollm2-135m-rpi5 (fails on a bad signature) and
#      edgepack pack dist/smollm2-135m-rpi5 --out smollm2-135m-rpi5.tar.gz
#   2. Put the archive in files/ beside this recipe, set EDGEPACK_BUNDLE and EDGEPACK_ARCHIVE_SHA256 (sha256sum
#      of the archive CI verified), and IMAGE_INSTALL:append = " edgepack-model" in the image.
#   3. On the device: /opt/edgepack/<bundle>/native/edgepack-chat --smoke   (exit 0: the golden tokens hold)
#
# Written for Yocto kirkstone/scarthgap (S under WORKDIR; with UNPACKDIR, use ${UNPACKDIR}/${EDGEPACK_BUNDLE}).
SUMMARY = "A quantized language model and its runtime, from an edgepack bundle"
LICENSE = "CLOSED"
# The model's and the runtime's licenses: edgepack.json "model.license" and sbom.cdx.json in the bundle.

EDGEPACK_BUNDLE ?= "smollm2-135m-rpi5"
EDGEPACK_ARCHIVE_SHA256 ?= ""
EDGEPACK_DIR = "/opt/edgepack/${EDGEPACK_BUNDLE}"

SRC_URI = "file://${EDGEPACK_BUNDLE}.tar.gz"
S = "${WORKDIR}/${EDGEPACK_BUNDLE}"

do_configure[noexec] = "1"
do_compile[noexec] = "1"

# file:// sources carry no checksum in bitbake: pin the archive CI verified, then every file against its manifest.
python do_verify_bundle() {
    import hashlib, json, os
    bundle = d.getVar("EDGEPACK_BUNDLE")
    want = d.getVar("EDGEPACK_ARCHIVE_SHA256")
    archive = os.path.join(d.getVar("WORKDIR"), bundle + ".tar.gz")
    if not want:
        bb.fatal("set EDGEPACK_ARCHIVE_SHA256 to the sha256 of %s.tar.gz (the archive CI verified)" % bundle)
    with open(archive, "rb") as fh:
        got = hashlib.sha256(fh.read()).hexdigest()
    if got != want:
        bb.fatal("%s.tar.gz has sha256 %s, the recipe pins %s" % (bundle, got, want))
    s = d.getVar("S")
    with open(os.path.join(s, "edgepack.json")) as fh:
        manifest = json.load(fh)
    for f in manifest["files"]:
        with open(os.path.join(s, f["path"]), "rb") as fh:
            if hashlib.sha256(fh.read()).hexdigest() != f["sha256"]:
                bb.fatal("%s differs from edgepack.json" % f["path"])
    if not (manifest.get("native") or {}).get("program"):
        bb.fatal("%s has no compiled native/edgepack-chat (edgepack.json native.why_no_program)" % bundle)
}
addtask verify_bundle after do_unpack before do_install

do_install() {
    install -d ${D}${EDGEPACK_DIR}/native ${D}${EDGEPACK_DIR}/model ${D}${includedir} ${D}${libdir}/pkgconfig
    install -m 0644 ${S}/edgepack.json ${D}${EDGEPACK_DIR}/edgepack.json
    install -m 0755 ${S}/native/edgepack-chat ${S}/native/libonnxruntime-genai.so ${S}/native/libonnxruntime.so.1 \
        ${D}${EDGEPACK_DIR}/native/
    cp -R --no-preserve=ownership ${S}/model/. ${D}${EDGEPACK_DIR}/model/
    chmod -R u=rwX,go=rX ${D}${EDGEPACK_DIR}/model
    # for the image's own programs: the header, and pkg-config pointing at the installed libraries
    install -m 0644 ${S}/native/edgepack_oga.h ${D}${includedir}/edgepack_oga.h
    sed -e 's|^prefix=.*|prefix=${EDGEPACK_DIR}/native|' -e 's|^includedir=.*|includedir=${includedir}|' \
        ${S}/native/edgepack-runtime.pc > ${D}${libdir}/pkgconfig/edgepack-runtime.pc
}

FILES:${PN} = "${EDGEPACK_DIR}"
FILES:${PN}-dev = "${includedir}/edgepack_oga.h ${libdir}/pkgconfig/edgepack-runtime.pc"
RDEPENDS:${PN} += "libstdc++"
# prebuilt, stripped binaries from the runtime's wheels, loaded by RUNPATH $ORIGIN
INSANE_SKIP:${PN} += "already-stripped ldflags dev-so file-rdeps"
