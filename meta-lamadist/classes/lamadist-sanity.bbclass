# lamadist-sanity: refuse configurations that break LamaDist's policy, whatever local.conf or a
# kas overlay says. Checked once per configuration (ConfigParsed), so parsing stops with one clear
# message instead of producing a silently weaker distribution. Image builds additionally need the
# signing key directory (BuildStarted), which parsing and task-graph checks do not.

def lamadist_policy_problems(d):
    problems = []
    features = (d.getVar('DISTRO_FEATURES') or '').split()
    for f in ('systemd', 'usrmerge', 'selinux', 'ima', 'tpm2', 'seccomp'):
        if f not in features:
            problems.append("DISTRO_FEATURES lacks '%s'" % f)
    for f in ('apparmor', 'sysvinit', 'smack'):
        if f in features:
            problems.append("DISTRO_FEATURES has '%s', which LamaDist forbids" % f)
    if (d.getVar('PACKAGE_CLASSES') or '').split()[:1] != ['package_rpm']:
        problems.append("PACKAGE_CLASSES must start with package_rpm (signed RPMs)")
    if 'sign_rpm' not in (d.getVar('INHERIT') or '').split():
        problems.append("sign_rpm is not inherited: RPMs would be unsigned")
    if d.getVar('DEFAULT_ENFORCING') != 'enforcing':
        problems.append("DEFAULT_ENFORCING is '%s', not 'enforcing'" % d.getVar('DEFAULT_ENFORCING'))
    if d.getVar('POLICY_TYPE') != 'targeted':
        problems.append("POLICY_TYPE is '%s', not 'targeted'" % d.getVar('POLICY_TYPE'))
    if 'create-spdx-3.0' not in (d.getVar('INHERIT') or '').split():
        problems.append("create-spdx-3.0 is not inherited: images would have no SPDX 3.0.1 SBOM")
    if d.getVar('VIRTUAL-RUNTIME_init_manager') != 'systemd':
        problems.append("the init manager is '%s', not systemd" % d.getVar('VIRTUAL-RUNTIME_init_manager'))
    return problems

addhandler lamadist_sanity_handler
lamadist_sanity_handler[eventmask] = "bb.event.ConfigParsed bb.event.BuildStarted"
python lamadist_sanity_handler() {
    data = e.data if hasattr(e, 'data') and e.data is not None else d
    if isinstance(e, bb.event.ConfigParsed):
        problems = lamadist_policy_problems(data)
    else:
        import lamadist.signing
        problems = lamadist.signing.problems(data.getVar('LAMADIST_SIGNING_DIR'))
    if problems:
        bb.fatal("LamaDist policy: " + "; ".join(problems))
}
