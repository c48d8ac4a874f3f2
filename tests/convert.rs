//! `clue convert lastfm` on small files written in the HetRec 2011 format.

use clue::data::convert::lastfm;

#[test]
fn lastfm_converts_latin1_tags_drops_junk_and_splits_targets_at_the_cutoff() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("raw");
    std::fs::create_dir(&input).unwrap();
    let write = |name: &str, bytes: &[u8]| std::fs::write(input.join(name), bytes).unwrap();
    write(
        "artists.dat",
        "id\tname\turl\tpictureURL\n1\tMALICE MIZER\tu\tp\n2\tDiary of Dreams\tu\tp\n3\t\tu\tp\n"
            .as_bytes(),
    );
    // Latin-1: "café" with é = 0xE9, invalid as UTF-8.
    write("tags.dat", b"tagID\ttagValue\n1\tmetal\n2\tcaf\xe9 music\n");
    write(
        "user_artists.dat",
        b"userID\tartistID\tweight\n7\t1\t500\n7\t2\t9000\n7\t3\t10\n8\t2\t1\n",
    );
    write(
        "user_taggedartists.dat",
        b"userID\tartistID\ttagID\tday\tmonth\tyear\n\
          7\t1\t2\t1\t4\t2009\n\
          7\t2\t1\t1\t1\t1956\n\
          7\t2\t1\t3\t8\t2010\n\
          7\t2\t2\t4\t8\t2010\n\
          7\t3\t1\t1\t4\t2009\n\
          8\t1\t1\t1\t3\t2008\n",
    );
    let out = dir.path().join("lastfm");
    let report = lastfm(&input, &out, "2010-07-01T00:00:00Z").unwrap();

    let tag = std::fs::read_to_string(out.join("logs/tag.csv")).unwrap();
    let lines: Vec<&str> = tag.lines().collect();
    assert_eq!(lines[0], "user_id,service,timestamp,text");
    assert!(
        lines.contains(&"7,tag,2009-04-01T00:00:00Z,café music: MALICE MIZER"),
        "{tag}"
    );
    assert!(
        lines.contains(&"8,tag,2008-03-01T00:00:00Z,metal: MALICE MIZER"),
        "{tag}"
    );
    assert_eq!(
        lines.len(),
        3,
        "junk date, nameless artist and targets are not features: {tag}"
    );

    // Listening: lightest first, so the heaviest is the most recent; the nameless artist dropped.
    let listen = std::fs::read_to_string(out.join("logs/listen.csv")).unwrap();
    assert_eq!(
        listen.lines().collect::<Vec<_>>(),
        vec![
            "user_id,service,timestamp,text",
            "7,listen,,MALICE MIZER",
            "7,listen,,Diary of Dreams",
            "8,listen,,Diary of Dreams"
        ]
    );
    // Targets: artists tagged on or after the cutoff, once per (user, artist).
    let inter = std::fs::read_to_string(out.join("tasks/tag-artist/interactions.csv")).unwrap();
    assert_eq!(inter.lines().count(), 2, "{inter}");
    assert!(inter.contains("7,2,1280793600"));
    let items = std::fs::read_to_string(out.join("tasks/tag-artist/items.csv")).unwrap();
    assert_eq!(items.lines().count(), 3, "two named artists: {items}");
    assert_eq!(
        report.dropped["tagging with a junk date (before 2005 or invalid)"],
        1
    );
    assert_eq!(
        report.dropped["tagging of an artist or tag without a name"],
        1
    );
    assert_eq!(report.dropped["listen of an artist without a name"], 1);
    let task = clue::eval::Task::load(&out.join("tasks/tag-artist.toml")).unwrap();
    assert_eq!(task.features.services, vec!["tag"]);

    // A missing file is named.
    std::fs::remove_file(input.join("tags.dat")).unwrap();
    let e = lastfm(&input, &dir.path().join("x"), "2010-07-01T00:00:00Z").unwrap_err();
    assert!(e.to_string().contains("tags.dat"), "{e}");
}
