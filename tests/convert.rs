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

#[test]
fn movielens_writes_movie_and_tag_services_and_a_next_movie_task() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("ml");
    std::fs::create_dir(&input).unwrap();
    let write = |name: &str, text: &str| std::fs::write(input.join(name), text).unwrap();
    write(
        "movies.csv",
        "movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n2,\"American President, The (1995)\",Comedy|Drama|Romance\n",
    );
    write(
        "ratings.csv",
        "userId,movieId,rating,timestamp\n1,1,4.0,1000\n1,2,3.5,2000\n1,99,1.0,3000\n2,2,5.0,1500\n",
    );
    write(
        "tags.csv",
        "userId,movieId,tag,timestamp\n1,2,politics,2100\n",
    );
    let out = dir.path().join("out");
    let report = clue::data::convert::movielens(&input, &out).unwrap();
    let movie = std::fs::read_to_string(out.join("logs/movie.csv")).unwrap();
    assert!(
        movie.contains("1,movie,2000,\"American President, The (1995) | Comedy, Drama, Romance\""),
        "{movie}"
    );
    assert_eq!(
        movie.lines().count(),
        4,
        "the rating of an unknown movie is dropped: {movie}"
    );
    let tag = std::fs::read_to_string(out.join("logs/tag.csv")).unwrap();
    assert!(
        tag.contains("1,tag,2100,\"politics: American President, The (1995)\""),
        "{tag}"
    );
    assert_eq!(
        report.dropped["rating or tag of a movie missing from movies.csv"],
        1
    );
    let task = clue::eval::Task::load(&out.join("tasks/next-movie.toml")).unwrap();
    assert_eq!(task.features.service.as_deref(), Some("movie"));
    assert_eq!(task.features.targets, 1);
    let inter = std::fs::read_to_string(out.join("tasks/next-movie/interactions.csv")).unwrap();
    assert_eq!(inter.lines().count(), 4);
}

#[test]
fn amazon_unisrec_rebuilds_each_history_from_the_test_rows() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("sci");
    std::fs::create_dir(&input).unwrap();
    let write = |name: &str, text: &str| std::fs::write(input.join(name), text).unwrap();
    write(
        "Sci.text",
        "item_id:token\ttext:token_seq\nA1\tSanding roll. Abrasives. PORTER. \nA2\tGlass beaker 250 ml. Lab. \nA4\tNitrile gloves. Safety. \n",
    );
    write("Sci.item2index", "A1\t0\nA2\t1\nA3\t2\nA4\t3\n");
    write("Sci.user2index", "REV1\t0\nREV2\t1\n");
    write(
        "Sci.test.inter",
        "user_id:token\titem_id_list:token_seq\titem_id:token\n0\t0 1 2\t3\n1\t1\t0\n",
    );
    let out = dir.path().join("out");
    let report = clue::data::convert::amazon_unisrec(&input, &out, "Sci").unwrap();
    let log = std::fs::read_to_string(out.join("logs/sci.csv")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(
        lines,
        vec![
            "user_id,service,timestamp,text",
            "REV1,sci,,Sanding roll. Abrasives. PORTER.",
            "REV1,sci,,Glass beaker 250 ml. Lab.",
            "REV1,sci,,Nitrile gloves. Safety.",
            "REV2,sci,,Glass beaker 250 ml. Lab.",
            "REV2,sci,,Sanding roll. Abrasives. PORTER.",
        ]
    );
    assert_eq!(report.dropped["interaction with an item without a text"], 1);
    let items = std::fs::read_to_string(out.join("tasks/next-product/items.csv")).unwrap();
    assert_eq!(items.lines().count(), 4, "three items with a text: {items}");
    // The target is the last row of each user's history in file order.
    let inter = std::fs::read_to_string(out.join("tasks/next-product/interactions.csv")).unwrap();
    assert_eq!(inter.lines().nth(3), Some("REV1,3,"));
}
