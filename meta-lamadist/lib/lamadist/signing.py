# SPDX-License-Identifier: Apache-2.0
"""The key directory of a LamaDist build (LAMADIST_SIGNING_DIR, made by `lamadist keys init`)."""

import os

# Files a full image build reads from the key directory: the Secure Boot db pair signs the UKIs,
# the RAUC CA becomes the device keyring, the RAUC signing pair signs bundles, and the RPM public
# key is what dnf verifies the signed packages against.
REQUIRED = ("db.crt", "db.key", "rauc-ca.crt", "rauc-signing.crt", "rauc-signing.key", "rpm-signing.pub.asc")


def problems(keydir):
    """What is wrong with keydir as a key directory, as a list of sentences (empty: usable)."""
    if not keydir:
        return ["LAMADIST_SIGNING_DIR is not set: export it (the directory `lamadist keys init` made)"]
    if not os.path.isdir(keydir):
        return ["LAMADIST_SIGNING_DIR %s is not a directory" % keydir]
    missing = [f for f in REQUIRED if not os.path.isfile(os.path.join(keydir, f))]
    return ["%s lacks %s" % (keydir, ", ".join(missing))] if missing else []
