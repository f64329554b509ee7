# lamadist-signing: recipes that install material from the key directory (LAMADIST_SIGNING_DIR)
# check at task time, not at parse time, that it is there; parsing stays possible without keys.
python lamadist_require_signing_dir () {
    import lamadist.signing
    problems = lamadist.signing.problems(d.getVar('LAMADIST_SIGNING_DIR'))
    if problems:
        bb.fatal("%s needs the signing keys: %s" % (d.getVar('PN'), "; ".join(problems)))
}
do_install[prefuncs] += "lamadist_require_signing_dir"
do_install[vardepsexclude] += "LAMADIST_SIGNING_DIR"
