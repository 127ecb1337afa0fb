"""The self-training family of Inconsistency Masks (Vorndran et al., arXiv 2401.14387): generations of
teachers that label the unlabeled images offline and students trained from scratch on labeled plus
pseudo-labeled data. ``driver.run_self_training`` runs the loop; ``student`` holds the LightningModules,
``masks`` the pseudo-labelling rules, ``data`` the students' training set, ``evalnet`` the pseudo-label
quality network of IM++ / AIM++."""
